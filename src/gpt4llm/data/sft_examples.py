"""Supervised fine-tuning examples exactly as stanford_alpaca's `preprocess()` builds them (batches: data.collators).

input_ids = tokenize(prompt + output + eos), truncated at `max_length`;
labels    = input_ids with the first len(tokenize(prompt)) positions set to -100.
Prompt and full text are tokenized separately, as stanford_alpaca does, so the ids are identical to its ids.
"""

from __future__ import annotations

from gpt4llm.data.encoding import IGNORE_INDEX, encode_truncated
from gpt4llm.data.prompts import format_prompt


def tokenize_batch(batch: dict[str, list], tokenizer, max_length: int) -> dict[str, list]:
    """`datasets.map(batched=True)` function: Alpaca records -> input_ids, labels and audit columns."""
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
