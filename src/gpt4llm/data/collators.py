"""Examples to batches: padded (SFT and reward-model pairs) or packed into one row, and how a packed row is read back.

A packed row (PackedCollator) holds a batch's examples one after another, position ids restarting at 0 for each;
`packed_lengths` reads the examples' lengths off those ids. Attention implementations that run each example of such a
row on its own are listed in PACKING_ATTENTION: with any other, a packed row would be one block-masked attention
over the sum of the lengths (data.sft_datamodule's `batching=auto` then pads instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt4llm.data.encoding import IGNORE_INDEX, pad_right, padded_batch

# flash attention's variable-length kernels, and gpt4llm.models.attention's sdpa_varlen
PACKING_ATTENTION = ("flash_attention_2", "flash_attention_3", "flash_attention_4", "sdpa_varlen")


def packed_lengths(position_ids: torch.Tensor) -> list[int]:
    """Lengths of the examples packed into one row (1-D position ids), from where the ids restart at 0."""
    starts = torch.nonzero(position_ids == 0).flatten().tolist()
    if not starts or starts[0] != 0:  # a continuation (decoding after a cache): one sequence
        return [len(position_ids)]
    return [end - start for start, end in zip(starts, starts[1:] + [len(position_ids)])]


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


class PairCollator:
    """B pairs -> one batch of 2B sequences, the B chosen first, then the B rejected in the same order: right-padded
    input ids, attention mask and labels (the response tokens; the prompt's are -100), or, `packed`, one row of all
    2B sequences with restarting position ids (as PackedCollator) and `sequence_lengths`. Each pair's row in its split,
    where the pairs carry it (DPO's precomputed reference is looked up by it), comes along as `pair_index`."""

    def __init__(self, pad_token_id: int, packed: bool = False) -> None:
        self.pad_token_id, self.packed = pad_token_id, packed

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        sequences = [e["chosen_input_ids"] for e in examples] + [e["rejected_input_ids"] for e in examples]
        batch = {}
        if "chosen_prompt_tokens" in examples[0]:
            prompts = [e["chosen_prompt_tokens"] for e in examples] + [e["rejected_prompt_tokens"] for e in examples]
            labels = [[IGNORE_INDEX] * n + list(s[n:]) for s, n in zip(sequences, prompts)]
            if self.packed:
                batch = PackedCollator()([{"input_ids": s, "labels": lab} for s, lab in zip(sequences, labels)])
                batch["sequence_lengths"] = torch.tensor([len(s) for s in sequences])
            else:
                batch = padded_batch(sequences, self.pad_token_id)
                batch["labels"] = pad_right(labels, IGNORE_INDEX, batch["input_ids"].size(1))[0]
        else:
            batch = padded_batch(sequences, self.pad_token_id)
        if "pair_index" in examples[0]:
            batch["pair_index"] = torch.tensor([e["pair_index"] for e in examples])
        return batch
