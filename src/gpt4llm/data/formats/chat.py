"""Chat formats: a conversation rendered by a chat template, `data.template=`

    chat          the model's own `tokenizer.chat_template`, through transformers' `apply_chat_template`
    chatml, llama3, vicuna_v1.1
                  a template shipped in formats/templates/, for base models without one of their own; its special
                  tokens are added to the tokenizer (the embeddings grow to match) and the export carries it

Labels: the loss is on what the template writes for each assistant turn, end-of-turn token included, and on nothing of
the system and user turns or the generation prompt. The method, not the template's `{% generation %}` markers (which
the shipped templates carry for other tools, and which the tests use as the independent oracle): for assistant turn k,
the text rendered for turns 0..k minus the text rendered for turns 0..k-1 with the generation prompt is that turn's
span; whitespace around it (ChatML's newline after <|im_end|>, the space after "ASSISTANT:") is not part of it. The
whole conversation is tokenized once, and a token is supervised when its characters fall in a span. Where a template
rewrites earlier turns depending on later ones (so that the shorter renderings are not prefixes of the whole), the
per-turn spans cannot be found: with train_on=all_assistant that is a ConfigError naming the template and
data.train_on=last_assistant, which needs only the last turn's prefix.

Truncation at max_length keeps whole turns from the start: the conversation is cut after the last assistant turn
that fits; where even the first turn trained on does not fit, it is cut at max_length (its start trained on, as the
Alpaca path cuts a long answer), and only a conversation whose prompt before that turn fills max_length is a counted
skip.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path

from gpt4llm.data.conversations import TurnProblem, alpaca_user_text, check_turns
from gpt4llm.data.encoding import IGNORE_INDEX, PairSide, encode_with_prompt
from gpt4llm.data.formats.base import SIDES, FormatProblem, PromptFormat, shipped_template
from gpt4llm.errors import ConfigError


@dataclass(frozen=True)
class ShippedTemplate:
    special_tokens: tuple[str, ...]  # added to the tokenizer, so each is one id
    end_of_turn: str | None  # what ends an assistant turn (generation stops there); None: the tokenizer's EOS


# The templates in formats/templates/<name>.jinja. ChatML; Meta's Llama 3 layout (header tokens, <|eot_id|>, contents
# trimmed) without the tools and date blocks; FastChat's vicuna_v1.1 (conversation.py: SeparatorStyle.ADD_COLON_TWO,
# sep " ", sep2 "</s>"), its system message the default when the conversation has none.
SHIPPED = {
    "chatml": ShippedTemplate(("<|im_start|>", "<|im_end|>"), "<|im_end|>"),
    "llama3": ShippedTemplate(
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "<|eot_id|>"
    ),
    "vicuna_v1.1": ShippedTemplate((), None),
}
OWN = "chat"  # the model's own chat template


@dataclass(frozen=True)
class ChatFormat(PromptFormat):
    name: str = OWN
    train_on: str = "all_assistant"
    conversational = True
    add_special_tokens = False  # the template writes its own BOS

    # --- the tokenizer ---
    def prepare_tokenizer(self, tokenizer, model: str = "the model") -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError(
                f"data.template={self.name} reads token offsets, which {model}'s SentencePiece tokenizer does not "
                "give: set model.tokenizer=tokenizers"
            )
        if self.name == OWN:
            if not tokenizer.chat_template:
                raise ConfigError(
                    f"data.template=chat: {model} has no chat template of its own (a base model): choose one with "
                    f"data.template={' or data.template='.join(SHIPPED)}, or keep the paper's data.template=alpaca"
                )
            return
        shipped = SHIPPED[self.name]
        if shipped.special_tokens:
            tokenizer.add_special_tokens({"additional_special_tokens": list(shipped.special_tokens)})
        tokenizer.chat_template = shipped_template(self.name)

    def template_text(self, tokenizer) -> str | None:
        return tokenizer.chat_template

    def stop_ids(self, tokenizer) -> list[int]:
        ids = [tokenizer.eos_token_id]
        end = SHIPPED[self.name].end_of_turn if self.name in SHIPPED else None
        if end is not None:
            ids.append(tokenizer.convert_tokens_to_ids(end))
        return ids

    # --- training data ---
    def load_records(self, path: Path, skip_invalid: bool = False):
        from gpt4llm.data.records import load_conversations

        return load_conversations(path, skip_invalid=skip_invalid)

    def tokenize_examples(self, batch: dict[str, list], tokenizer, max_length: int) -> dict[str, list]:
        return tokenize_conversations(batch, tokenizer, max_length, self.train_on, self.stop_ids(tokenizer))

    def pair_prompt(self, messages: list[dict[str, str]]) -> str:
        try:
            check_turns(messages, final="user")
        except TurnProblem as problem:
            raise FormatProblem(f"the prompt: {problem}") from None
        return json.dumps(messages, ensure_ascii=False)

    def tokenize_pairs(self, batch, tokenizer, max_length):
        # the prompt is a conversation (JSON) and each response its final assistant turn, rendered whole
        prompts = [json.loads(p) for p in batch["prompt"]]
        prompt_tokens = self._prompt_tokens(tokenizer, prompts)  # once for both sides
        return tuple(self._responses(tokenizer, prompts, batch[side], prompt_tokens, max_length) for side in SIDES)

    @staticmethod
    def _prompt_tokens(tokenizer, prompts: list[list[dict]]) -> list[int]:
        # what the template writes before the answer: the conversation and its generation prompt
        prefixes = render(tokenizer, prompts, add_generation_prompt=True)
        return [len(ids) for ids in tokenizer(prefixes, add_special_tokens=False)["input_ids"]]

    @staticmethod
    def _responses(tokenizer, prompts, responses, prompt_tokens: list[int], max_length: int) -> PairSide:
        texts = render(tokenizer, [p + [{"role": "assistant", "content": r}] for p, r in zip(prompts, responses)])
        return encode_with_prompt(tokenizer, texts, prompt_tokens, max_length, add_special_tokens=False)

    def held_out_examples(self, tokenizer, rows) -> list[dict[str, str]]:
        conversations = [list(r["messages"]) for r in rows]
        prompts = render(tokenizer, [c[:-1] for c in conversations], add_generation_prompt=True)
        return [{"prompt": p, "output": c[-1]["content"]} for p, c in zip(prompts, conversations)]

    # --- prompts to answer, responses to score ---
    def record_prompts(self, tokenizer, records: list[dict]) -> list[str]:
        users = [[{"role": "user", "content": alpaca_user_text(r["instruction"], r.get("input", ""))}] for r in records]
        return render(tokenizer, users, add_generation_prompt=True)

    def chat_prompt(self, tokenizer, conversation: list[dict[str, str]]) -> str:
        if any(m["role"] == "tool" for m in conversation):
            raise FormatProblem("tool messages are not supported by this server")
        try:
            check_turns(conversation, final="user")
        except TurnProblem as problem:
            raise FormatProblem(f"'messages' {problem}") from None
        return render(tokenizer, [conversation], add_generation_prompt=True)[0]

    def score_prompt(self, record: dict) -> str:
        # the user turn's text: the template renders it with the response as one conversation
        return (
            record["prompt"] if "prompt" in record else alpaca_user_text(record["instruction"], record.get("input", ""))
        )

    def reward_ids(self, tokenizer, prompts, responses, max_length):
        users = [[{"role": "user", "content": p}] for p in prompts]
        return self._responses(tokenizer, users, responses, self._prompt_tokens(tokenizer, users), max_length).ids


# --- conversations to ids and labels ---------------------------------------------------------------------------------
def render(tokenizer, conversations: list[list[dict]], add_generation_prompt: bool = False) -> list[str]:
    """The tokenizer's chat template over a batch of conversations, as text."""
    if not conversations:
        return []
    return tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(
    tokenizer, conversations: list[list[dict]], fulls: list[str], train_on: str, untrained: list[list[int]]
) -> list[list[tuple]]:
    """For each rendered conversation, the character spans of the assistant turns to train on (see above; not those
    in `untrained`, the turns its data marked `weight: 0`); the shorter renderings of a whole batch in two template
    calls."""
    chosen = []
    for messages, skip in zip(conversations, untrained):
        turns = [k for k, m in enumerate(messages) if m["role"] == "assistant" and k not in skip]
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


def tokenize_conversations(
    batch: dict[str, list], tokenizer, max_length: int, train_on: str, stop_ids: list[int] | None = None
) -> dict[str, list]:
    """`datasets.map(batched=True)` function: conversations -> input_ids, labels and the audit columns the Alpaca
    format gives, plus `turns_dropped`. A conversation whose first assistant turn trained on does not fit gets no ids
    (the caller counts it as skipped). `ends_with_eos`: the last token trained on ends a turn (one of `stop_ids`, the
    format's end-of-turn ids; the tokenizer's EOS when not given), whatever whitespace the template writes after it."""
    end_ids = set(stop_ids or [tokenizer.eos_token_id])
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
    untrained = batch.get("untrained") or [[] for _ in conversations]  # weight-0 turns (data.conversations)
    all_spans = assistant_spans(tokenizer, conversations, texts, train_on, untrained)
    for spans, ids, offsets in zip(all_spans, encoded["input_ids"], encoded["offset_mapping"]):
        starts, stops = [a for a, _ in offsets], [b for _, b in offsets]
        # each span as the tokens whose characters overlap it: [first, after last)
        ranges = [(bisect.bisect_right(stops, start), bisect.bisect_left(starts, end)) for start, end in spans]
        kept = [r for r in ranges if r[1] <= max_length]
        if not kept and ranges and ranges[0][0] < max_length:
            # the first turn trained on does not fit whole: its start is kept, cut at max_length, as the Alpaca path
            # (and TRL's) cuts a long answer; only a prompt that fills max_length leaves nothing to train on
            kept = [(ranges[0][0], max_length)]
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
        trained = [label for label in labels if label != IGNORE_INDEX]
        out["ends_with_eos"].append(bool(trained) and trained[-1] in end_ids)
        out["turns_dropped"].append(len(ranges) - len(kept))
    return out
