"""The paper's format: stanford_alpaca's prompt around one instruction (and its input), ids exactly as its
`preprocess()` builds them.

input_ids = tokenize(prompt + output + eos), truncated at `max_length`;
labels    = input_ids with the first len(tokenize(prompt)) positions set to -100.
Prompt and full text are tokenized separately, as stanford_alpaca does, so the ids are identical to its ids. A reward
model's and DPO's sequences are the same text (prompt + response + EOS), so a reward is read where the policy stops.

A conversation is one user turn here: the system prompt and earlier turns have no place in the template (a record
with them is a counted skip; a chat request is answered from its last user message).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gpt4llm.data.encoding import IGNORE_INDEX, PairSide, encode_truncated, encode_with_prompt
from gpt4llm.data.formats.base import SIDES, FormatProblem, PromptFormat, Unfit, shipped_template
from gpt4llm.data.prompts import alpaca_prompt, format_prompt


@dataclass(frozen=True)
class AlpacaFormat(PromptFormat):
    name: str = "alpaca"
    train_on: str = "all_assistant"  # one answer per record: there is no other turn
    conversational = False
    add_special_tokens = True

    def export_chat_template(self) -> str:
        # the paper's prompt as a chat template: BOS, the no-input Alpaca template around the last user message, and
        # for a finished conversation the answer and EOS (a base model's own template would not be the one learned)
        return shipped_template("alpaca")

    # --- training data ---
    def load_records(self, path: Path, skip_invalid: bool = False):
        from gpt4llm.data.records import load_instruction_records

        return load_instruction_records(path, skip_invalid=skip_invalid)

    def tokenize_examples(self, batch: dict[str, list], tokenizer, max_length: int) -> dict[str, list]:
        prompts = [format_prompt(i, x) for i, x in zip(batch["instruction"], batch["input"])]
        texts = [p + o + tokenizer.eos_token for p, o in zip(prompts, batch["output"])]
        full, true_lengths = encode_truncated(tokenizer, texts, max_length)
        prompt_lens = [len(ids) for ids in tokenizer(prompts, max_length=max_length, truncation=True)["input_ids"]]
        labels = [[IGNORE_INDEX] * min(n, len(ids)) + ids[n:] for ids, n in zip(full, prompt_lens)]
        eos = tokenizer.eos_token_id
        return {
            "input_ids": full,
            "labels": labels,
            "num_tokens": [len(ids) for ids in full],
            "untruncated_tokens": true_lengths,
            "supervised_tokens": [sum(t != IGNORE_INDEX for t in lab) for lab in labels],
            "ends_with_eos": [bool(lab) and lab[-1] == eos for lab in labels],
        }

    def pair_prompt(self, messages: list[dict[str, str]]) -> str:
        if [m["role"] for m in messages] != ["user"]:
            raise Unfit(
                f"the prompt is a conversation ({len(messages)} turns): the paper's template holds one user turn"
            )
        return alpaca_prompt(messages[0]["content"])

    def tokenize_pairs(self, batch, tokenizer, max_length):
        prompt_tokens = self._prompt_tokens(tokenizer, batch["prompt"])  # once for both sides
        return tuple(
            self._responses(tokenizer, batch["prompt"], batch[side], prompt_tokens, max_length) for side in SIDES
        )

    @staticmethod
    def _prompt_tokens(tokenizer, prompts: list[str]) -> list[int]:
        # the prompt's length from tokenizing it alone, as SFT's labels mask it
        return [len(ids) for ids in tokenizer(prompts)["input_ids"]]

    @staticmethod
    def _responses(tokenizer, prompts, responses, prompt_tokens: list[int], max_length: int) -> PairSide:
        texts = [p + r + tokenizer.eos_token for p, r in zip(prompts, responses)]  # prompt + response + EOS
        return encode_with_prompt(tokenizer, texts, prompt_tokens, max_length)

    def held_out_examples(self, tokenizer, rows) -> list[dict[str, str]]:
        records = [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]} for r in rows]
        return [{"prompt": p, "output": r["output"]} for p, r in zip(self.record_prompts(tokenizer, records), records)]

    # --- prompts to answer, responses to score ---
    def record_prompts(self, tokenizer, records: list[dict]) -> list[str]:
        return [format_prompt(r["instruction"], r.get("input", "")) for r in records]

    def chat_prompt(self, tokenizer, conversation: list[dict[str, str]]) -> str:
        # The last user message is the instruction (or, when it already is an Alpaca prompt, the prompt itself): the
        # model only ever saw single-turn prompts, whose fixed preamble stands in for a system prompt.
        users = [m["content"] for m in conversation if m["role"] == "user"]
        if not users:
            raise FormatProblem("'messages' has no user message: the last user message is the instruction")
        if not users[-1].strip():
            raise FormatProblem("the last user message is empty")
        return alpaca_prompt(users[-1])

    def score_prompt(self, record: dict) -> str:
        if "prompt" in record:
            return alpaca_prompt(record["prompt"])
        return format_prompt(record["instruction"], record.get("input", ""))

    def reward_ids(self, tokenizer, prompts, responses, max_length):
        return self._responses(tokenizer, prompts, responses, self._prompt_tokens(tokenizer, prompts), max_length).ids
