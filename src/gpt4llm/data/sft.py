"""Supervised fine-tuning examples exactly as stanford_alpaca's `preprocess()` builds them, and their batches.

input_ids = tokenize(prompt + output + eos), truncated at `max_length`;
labels    = input_ids with the first len(tokenize(prompt)) positions set to -100.
Prompt and full text are tokenized separately, as stanford_alpaca does, so the ids are identical to its ids.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from gpt4llm.data.encoding import encode_truncated, pad_right
from gpt4llm.data.prompts import format_prompt
from gpt4llm.data.samplers import EpochSampler

IGNORE_INDEX = -100  # torch's cross-entropy default ignore_index


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
        input_ids, attention_mask = pad_right([e["input_ids"] for e in examples], self.pad_token_id, longest)
        labels, _ = pad_right([e["labels"] for e in examples], IGNORE_INDEX, longest)
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


@dataclass
class PackedCollator:
    """Concatenates a batch's examples into one row, so no token of the batch is padding.

    Position ids restart at 0 for every example and no attention mask is passed: from that layout transformers
    builds a block-diagonal causal mask (flash-attention varlen on GPUs that have it, SDPA / eager / flex
    elsewhere), so no token attends across an example boundary. Each example's first label is -100 (it always is
    a prompt token), so no example is trained to predict from the one before it; the summed loss over supervised
    tokens, and so the per-token mean, is that of the same examples unpacked.
    """

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        input_ids = torch.cat([torch.as_tensor(e["input_ids"]) for e in examples])
        labels = torch.cat([torch.as_tensor(e["labels"]) for e in examples])
        starts = torch.tensor([0] + [len(e["input_ids"]) for e in examples[:-1]]).cumsum(0)
        labels[starts] = IGNORE_INDEX
        position_ids = torch.cat([torch.arange(len(e["input_ids"])) for e in examples])
        return {"input_ids": input_ids[None], "labels": labels[None], "position_ids": position_ids[None]}


class LengthGroupedSampler(EpochSampler):
    """Random batches of examples of similar length, so a padded batch wastes little.

    Each epoch shuffles the examples, sorts each group of `group_batches` batches by length (longest first), cuts
    it into batches and shuffles the batches. Over several processes the unit is one batch for each of them: the
    processes' batches of a step are cut from one sorted run, so each is of similar lengths too.
    """

    def __init__(
        self, lengths: list[int], batch_size: int, seed: int = 0, group_batches: int = 64, rank: int = 0, world_size: int = 1
    ) -> None:
        super().__init__(len(lengths), seed, rank, world_size)
        self.lengths, self.batch_size, self.group_batches = lengths, batch_size, group_batches

    def order(self, epoch: int) -> list[int]:
        rng = random.Random(f"{self.seed}-{epoch}")
        indices = list(range(len(self.lengths)))
        rng.shuffle(indices)
        unit = self.batch_size * self.world_size
        group = unit * self.group_batches
        batches = []
        for start in range(0, len(indices), group):
            chunk = sorted(indices[start : start + group], key=self.lengths.__getitem__, reverse=True)
            batches += [chunk[i : i + unit] for i in range(0, len(chunk), unit)]
        # Only the very last batch can be short; it stays last so every other batch keeps its size.
        last = [batches.pop()] if len(batches[-1]) < unit else []
        rng.shuffle(batches)
        return [i for batch in batches + last for i in batch]
