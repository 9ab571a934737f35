"""How a conversation (data.conversations) becomes token ids and labels: `data.template`.

    alpaca        the paper's: stanford_alpaca's prompt around one user turn (data.sft_examples); the default
    chat          the model's own `tokenizer.chat_template`, through transformers' `apply_chat_template`
    chatml, llama3, vicuna_v1.1
                  a template shipped here, for base models without one of their own; its special tokens are added
                  to the tokenizer (the embeddings grow to match) and the export carries it

Labels with a chat template: the loss is on what the template writes for each assistant turn, end-of-turn token
included, and on nothing of the system and user turns or the generation prompt. The method, not the template's
`{% generation %}` markers (which the shipped templates carry for other tools, and which the tests use as the
independent oracle): for assistant turn k, the text rendered for turns 0..k minus the text rendered for turns 0..k-1
with the generation prompt is that turn's span; whitespace around it (ChatML's newline after <|im_end|>, the space
after "ASSISTANT:") is not part of it. The whole conversation is tokenized once, and a token is supervised when its
characters fall in a span. Where a template rewrites earlier turns depending on later ones (so that the shorter
renderings are not prefixes of the whole), the per-turn spans cannot be found: with train_on=all_assistant that is a
ConfigError naming the template and data.train_on=last_assistant, which needs only the last turn's prefix.

Truncation at max_length keeps whole turns from the start: the conversation is cut after the last assistant turn
that fits, and a conversation whose first assistant turn does not fit is a counted skip.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass

from gpt4llm.data.conversations import alpaca_user_text
from gpt4llm.data.encoding import IGNORE_INDEX
from gpt4llm.data.prompts import format_prompt
from gpt4llm.errors import ConfigError

TRAIN_ON = ("all_assistant", "last_assistant")


@dataclass(frozen=True)
class NamedTemplate:
    jinja: str
    special_tokens: tuple[str, ...]  # added to the tokenizer, so each is one id
    end_of_turn: str | None  # what ends an assistant turn (generation stops there); None: the tokenizer's EOS


CHATML = NamedTemplate(
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}{{ message['content'] + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}",
    ("<|im_start|>", "<|im_end|>"),
    "<|im_end|>",
)
# Meta's Llama 3 layout (header tokens, <|eot_id|>, contents trimmed), without the tools and date blocks.
LLAMA3 = NamedTemplate(
    "{{- '<|begin_of_text|>' -}}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{%- else -%}{{ message['content'] | trim + '<|eot_id|>' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}",
    ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "<|eot_id|>",
)
# FastChat's vicuna_v1.1 (conversation.py: SeparatorStyle.ADD_COLON_TWO, sep " ", sep2 "</s>"), its system message
# the default when the conversation has none.
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
VICUNA = NamedTemplate(
    "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
    "{%- else -%}{%- set system = '" + VICUNA_SYSTEM.replace("'", "\\'") + "' -%}{%- endif -%}"
    "{{ bos_token + system + ' ' }}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{%- if message['role'] == 'user' -%}{{ 'USER: ' + message['content'] + ' ' }}"
    "{%- else -%}{{ 'ASSISTANT: ' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}",
    (),
    None,
)
NAMED = {"chatml": CHATML, "llama3": LLAMA3, "vicuna_v1.1": VICUNA}
TEMPLATES = ("alpaca", "chat", *NAMED)


def check_template(template: str, train_on: str = "all_assistant") -> None:
    if template not in TEMPLATES:
        raise ConfigError(f"data.template={template!r}: choose one of {', '.join(TEMPLATES)}")
    if train_on not in TRAIN_ON:
        raise ConfigError(f"data.train_on={train_on!r}: choose one of {', '.join(TRAIN_ON)}")


def apply_template(tokenizer, template: str, model: str = "the model") -> None:
    """Makes `tokenizer` render `template`: a named one is set as its chat template (its special tokens added); `chat`
    needs the model's own. A ConfigError names the model and the fix where that cannot be."""
    check_template(template)
    if template == "alpaca":
        return
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"data.template={template} reads token offsets, which {model}'s SentencePiece tokenizer does not give: "
            "set model.tokenizer=tokenizers"
        )
    if template == "chat":
        if not tokenizer.chat_template:
            raise ConfigError(
                f"data.template=chat: {model} has no chat template of its own (a base model): choose one with "
                f"data.template={' or data.template='.join(NAMED)}, or keep the paper's data.template=alpaca"
            )
        return
    named = NAMED[template]
    if named.special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(named.special_tokens)})
    tokenizer.chat_template = named.jinja


def end_of_turn_ids(tokenizer, template: str) -> list[int]:
    """The ids that end an assistant turn under `template` (generation stops at any of them): EOS, and the named
    template's end-of-turn token."""
    ids = [tokenizer.eos_token_id]
    end = NAMED[template].end_of_turn if template in NAMED else None
    if end is not None:
        ids.append(tokenizer.convert_tokens_to_ids(end))
    return ids


# --- conversations to ids and labels ---------------------------------------------------------------------------------
def render(tokenizer, conversations: list[list[dict]], add_generation_prompt: bool = False) -> list[str]:
    """The tokenizer's chat template over a batch of conversations, as text."""
    if not conversations:
        return []
    return tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, conversations: list[list[dict]], fulls: list[str], train_on: str) -> list[list[tuple]]:
    """For each rendered conversation, the character spans of the assistant turns to train on (see above); the
    shorter renderings of a whole batch in two template calls."""
    chosen = []
    for messages in conversations:
        turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
        chosen.append(turns if train_on == "all_assistant" else turns[-1:])
    prefixes = iter(render(tokenizer, [m[:k] for m, ks in zip(conversations, chosen) for k in ks], True))
    wholes = iter(render(tokenizer, [m[: k + 1] for m, ks in zip(conversations, chosen) for k in ks[:-1]]))
    out = []
    for messages, ks, full in zip(conversations, chosen, fulls):
        spans = []
        for n, k in enumerate(ks):
            prefix, whole = next(prefixes), (next(wholes) if n < len(ks) - 1 else full)
            if not (whole.startswith(prefix) and full.startswith(whole)):
                raise ConfigError(
                    f"the chat template renders earlier turns differently once later ones follow (turn {k}), so the "
                    "assistant turns cannot be told apart: train on the final one with data.train_on=last_assistant"
                )
            spans.append(_span(whole, len(prefix), messages[k]["content"]))
        out.append(spans)
    return out


def _span(whole: str, start: int, content: str) -> tuple[int, int]:
    """Turn k's characters in `whole` after the generation prompt ends at `start`: from where the assistant's content
    begins (so a template's space or newline before it is left out, and the content's own leading whitespace kept),
    to the end of what the template wrote for the turn, whitespace after it left out (ChatML's newline)."""
    end = len(whole)
    while end > start and whole[end - 1].isspace():
        end -= 1
    for text in (content, content.strip()):  # a template may trim the content (Llama 3's does)
        at = whole.find(text, start, end) if text else -1
        if at >= 0:
            return at, end
    while start < end and whole[start].isspace():  # a template that rewrites the content: its whitespace left out
        start += 1
    return start, end


def tokenize_conversations(batch: dict[str, list], tokenizer, max_length: int, train_on: str) -> dict[str, list]:
    """`datasets.map(batched=True)` function: conversations -> input_ids, labels and the audit columns of
    data.sft_examples.tokenize_batch, plus `turns_dropped`. A conversation whose first assistant turn trained on does
    not fit gets no ids (the caller counts it as skipped)."""
    conversations = [json.loads(m) if isinstance(m, str) else m for m in batch["messages"]]
    texts = render(tokenizer, conversations)
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out: dict[str, list] = {
        k: []
        for k in (
            "input_ids",
            "labels",
            "num_tokens",
            "untruncated_tokens",
            "supervised_tokens",
            "ends_with_eos",
            "turns_dropped",
        )
    }
    all_spans = assistant_spans(tokenizer, conversations, texts, train_on)
    for spans, ids, offsets in zip(all_spans, encoded["input_ids"], encoded["offset_mapping"]):
        starts, stops = [a for a, _ in offsets], [b for _, b in offsets]
        # each span as the tokens whose characters overlap it: [first, after last)
        ranges = [(bisect.bisect_right(stops, start), bisect.bisect_left(starts, end)) for start, end in spans]
        kept = [r for r in ranges if r[1] <= max_length]
        # all of it when it fits; else up to the end of the last assistant turn that fits; else nothing (skipped)
        cut = len(ids) if len(ids) <= max_length and kept else kept[-1][1] if kept else 0
        labels = [IGNORE_INDEX] * cut
        for first, after in kept:
            labels[first:after] = ids[first:after]
        out["input_ids"].append(ids[:cut])
        out["labels"].append(labels)
        out["num_tokens"].append(cut)
        out["untruncated_tokens"].append(len(ids))
        out["supervised_tokens"].append(sum(after - first for first, after in kept))
        out["ends_with_eos"].append(bool(labels) and labels[-1] != IGNORE_INDEX)
        out["turns_dropped"].append(len(ranges) - len(kept))
    return out


# --- prompts to answer -----------------------------------------------------------------------------------------------
def render_prompts(tokenizer, template: str, records: list[dict]) -> list[str]:
    """The prompt each record (instruction, optional input) is answered from, as training rendered it: the Alpaca
    template, or the chat template's user turn and generation prompt."""
    if template == "alpaca":
        return [format_prompt(r["instruction"], r.get("input", "")) for r in records]
    users = [[{"role": "user", "content": alpaca_user_text(r["instruction"], r.get("input", ""))}] for r in records]
    return render(tokenizer, users, add_generation_prompt=True)
