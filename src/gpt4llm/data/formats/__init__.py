"""Prompt formats: how records and conversations become token ids, loss masks, prompts and stop ids (`data.template`).

    alpaca        the paper's: stanford_alpaca's prompt around one user turn (formats.alpaca); the default
    chat          the model's own `tokenizer.chat_template` (formats.chat)
    chatml, llama3, vicuna_v1.1
                  a chat template shipped in formats/templates/, for base models without one of their own

`prompt_format(name)` is chosen once, from `data.template` in training and from an export's model card
(gpt4llm.models.model_card) after it; every other module asks the object (formats.base.PromptFormat) instead of
comparing names, which only this package does (tests/test_formats.py holds that).
"""

from __future__ import annotations

from typing import NamedTuple

from gpt4llm.data.formats.alpaca import AlpacaFormat
from gpt4llm.data.formats.base import TRAIN_ON, FormatProblem, PromptFormat, Unfit
from gpt4llm.data.formats.chat import OWN, SHIPPED, ChatFormat
from gpt4llm.errors import ConfigError

PAPER = "alpaca"
AUTO = "auto"  # data.template's default: the model's own chat template where it has one (TRL's choice), else PAPER
FORMATS = (PAPER, OWN, *SHIPPED)

__all__ = [
    "AUTO",
    "FORMATS",
    "OWN",
    "PAPER",
    "SHIPPED",
    "FormatProblem",
    "PromptFormat",
    "Resolved",
    "Unfit",
    "check_format",
    "prompt_format",
    "resolve_format",
    "shipped_format_of",
]


def check_format(name: str, train_on: str = "all_assistant") -> None:
    if name not in FORMATS:
        raise ConfigError(f"data.template={name!r}: choose one of {', '.join((AUTO, *FORMATS))}")
    if train_on not in TRAIN_ON:
        raise ConfigError(f"data.train_on={train_on!r}: choose one of {', '.join(TRAIN_ON)}")


class Resolved(NamedTuple):
    format: PromptFormat
    why: str  # said at start: which prompt format trains or answers, and how that was decided


def resolve_format(name: str, tokenizer, train_on: str = "all_assistant") -> Resolved:
    """The format `data.template=name` means for `tokenizer`. `auto`: the format whose shipped template the tokenizer
    carries (an export of ours), else the tokenizer's own chat template (a chat model), else the paper's Alpaca prompt
    (a base model)."""
    if name != AUTO:
        return Resolved(prompt_format(name, train_on), f"{name} (data.template={name})")
    shipped = shipped_format_of(tokenizer)
    if shipped is not None:
        return Resolved(prompt_format(shipped.name, train_on), f"{shipped.name}, the template its tokenizer carries")
    if getattr(tokenizer, "chat_template", None):
        return Resolved(prompt_format(OWN, train_on), "chat: the model's own chat template")
    return Resolved(prompt_format(PAPER), "alpaca: the paper's prompt (the model has no chat template of its own)")


def shipped_format_of(tokenizer) -> PromptFormat | None:
    """The format whose shipped chat template `tokenizer` carries word for word (an export of ours, or its adapter
    directory, records it this way too), None for any other."""
    from gpt4llm.data.formats.base import shipped_template

    text = getattr(tokenizer, "chat_template", None)
    if not isinstance(text, str):
        return None
    return next((prompt_format(name) for name in (PAPER, *SHIPPED) if shipped_template(name) == text), None)


def prompt_format(name: str = PAPER, train_on: str = "all_assistant") -> PromptFormat:
    """The format `data.template=name` selects (a ConfigError listing the choices for another name; `auto` is
    decided against a tokenizer: resolve_format)."""
    if name == AUTO:
        raise ValueError("data.template=auto is decided against the model's tokenizer: call resolve_format")
    check_format(name, train_on)
    return AlpacaFormat() if name == PAPER else ChatFormat(name, train_on)
