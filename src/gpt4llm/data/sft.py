"""Supervised fine-tuning examples exactly as stanford_alpaca's `preprocess()` builds them, and their batches.

input_ids = tokenize(prompt + output + eos), truncated at `max_length`;
labels    = input_ids with the first len(tokenize(prompt)) positions set to -100.
Prompt and full text are tokenized separately, as stanford_alpaca does, so the ids are identical to its ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt4llm.prompts import format_prompt

IGNORE_INDEX = -100  # torch's cross-entropy default ignore_index


def tokenize_batch(batch: dict[str, list], tokenizer, max_length: int) -> dict[str, list]:
    """`datasets.map(batched=True)` function: Alpaca records -> input_ids, labels and audit columns."""
    prompts = [format_prompt(i, x) for i, x in zip(batch["instruction"], batch["input"])]
    texts = [p + o + tokenizer.eos_token for p, o in zip(prompts, batch["output"])]
    # Untruncated first, so the audit knows true lengths; the few over the limit are re-tokenized with the
    # tokenizer's own truncation, which is what stanford_alpaca did for every record.
    full = tokenizer(texts)["input_ids"]
    true_lengths = [len(ids) for ids in full]
    too_long = [i for i, ids in enumerate(full) if len(ids) > max_length]
    if too_long:
        cut = tokenizer([texts[i] for i in too_long], max_length=max_length, truncation=True)["input_ids"]
        for i, ids in zip(too_long, cut):
            full[i] = ids
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


@dataclass
class SFTCollator:
    """Right-pads a batch to its longest example: pad id in input_ids, -100 in labels, 0 in attention_mask.

    The attention mask comes from the lengths, not from `input_ids != pad`, so a pad token that is also EOS
    never hides the real EOS.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            input_ids[row, :n] = torch.as_tensor(example["input_ids"])
            labels[row, :n] = torch.as_tensor(example["labels"])
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
