"""What a prompt format answers, the one seam between records and token ids that the data modules, the export, serve,
generate, score and evaluate all ask (gpt4llm.data.formats.prompt_format picks one from `data.template`).

A format is stateless (its name and what it trains on): the tokenizer is an argument, so a format is cheap to pickle
into `datasets.map`'s worker processes and to rebuild from an export's recorded name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpt4llm.data.encoding import PairSide

TRAIN_ON = ("all_assistant", "last_assistant")
SIDES = ("chosen", "rejected")  # a comparison's two responses, in the order tokenize_pairs returns them
TEMPLATE_FILES = Path(__file__).with_name("templates")


class FormatProblem(Exception):
    """A conversation this format cannot hold or answer (no user turn, a turn out of order): the message says which;
    callers make it their own error (a RecordError, an HTTP 400)."""


class Unfit(FormatProblem):
    """A well-formed record that this format has no place for (a conversation in the paper's one-turn template): a
    counted skip, not an error."""


def shipped_template(name: str) -> str:
    """A Jinja chat template shipped in formats/templates/ (one file each, the trailing newline an editor adds left
    off, so the text is what tokenizer_config.json carries)."""
    return (TEMPLATE_FILES / f"{name}.jinja").read_text(encoding="utf-8").removesuffix("\n")


class PromptFormat:
    """How a record or a conversation becomes ids and labels, a pair its two sequences, a prompt its generation input,
    and what an export carries. Subclasses: data.formats.alpaca.AlpacaFormat, data.formats.chat.ChatFormat."""

    name: str
    train_on: str = "all_assistant"
    # Records are read as conversations (multi-turn, system prompts) rather than as instruction/input/output.
    conversational: bool = False
    # Prompts are tokenized with the tokenizer's own special tokens (BOS): a chat template writes its own.
    add_special_tokens: bool = True

    # --- the tokenizer ---
    def prepare_tokenizer(self, tokenizer, model: str = "the model") -> None:
        """Makes `tokenizer` able to render this format (a shipped template set, its special tokens added), or a
        ConfigError naming `model` and the fix."""

    def template_text(self, tokenizer) -> str | None:
        """The chat template the ids depend on (a cache keys on its text, not on its name); None for none."""
        return None

    def export_chat_template(self) -> str | None:
        """The chat template an export must carry for `apply_chat_template` to build the training prompt; None: the
        tokenizer's own (already the one trained with)."""
        return None

    def stop_ids(self, tokenizer) -> list[int]:
        """The ids that end an assistant turn (generation stops at any of them)."""
        return [tokenizer.eos_token_id]

    # --- training data ---
    def load_records(self, path: Path, skip_invalid: bool = False) -> tuple[list[dict], Any]:
        """The records of an SFT file this format trains on, and the loader's report."""
        raise NotImplementedError

    def tokenize_examples(self, batch: dict[str, list], tokenizer, max_length: int) -> dict[str, list]:
        """`datasets.map(batched=True)` function: SFT records -> input_ids, labels and the audit columns
        (num_tokens, untruncated_tokens, supervised_tokens, ends_with_eos)."""
        raise NotImplementedError

    def pair_prompt(self, messages: list[dict[str, str]]) -> str:
        """The prompt of a comparison as the pairs carry it (a FormatProblem when this format cannot hold it)."""
        raise NotImplementedError

    def tokenize_pairs(self, batch: dict[str, list], tokenizer, max_length: int) -> tuple[PairSide, PairSide]:
        """Pairs -> the chosen and the rejected side (data.encoding.PairSide): each sequence is prompt + response +
        end, at most `max_length` long: right-truncated, or, when the prompt takes more than half of it, the prompt's
        start cut (encoding.keep_the_answer); reward_ids cuts alike, so a score sees what training saw."""
        raise NotImplementedError

    def held_out_examples(self, tokenizer, rows) -> list[dict[str, str]]:
        """Held-out SFT rows as {prompt, output}: the prompt as training rendered it, and the reference answer."""
        raise NotImplementedError

    # --- prompts to answer, responses to score ---
    def record_prompts(self, tokenizer, records: list[dict]) -> list[str]:
        """The prompt each record (instruction, optional input) is answered from, as training rendered it."""
        raise NotImplementedError

    def chat_prompt(self, tokenizer, conversation: list[dict[str, str]]) -> str:
        """The prompt a chat request's conversation (system?, user, assistant, ..., user) is answered from."""
        raise NotImplementedError

    def score_prompt(self, record: dict) -> str:
        """The prompt of a record to score (`prompt`, or `instruction` and `input`), as reward training saw it."""
        raise NotImplementedError

    def reward_ids(self, tokenizer, prompts: list[str], responses: list[str], max_length: int) -> list[list[int]]:
        """The ids a reward model scores for each (prompt, response), built and truncated as in its training."""
        raise NotImplementedError
