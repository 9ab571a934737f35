"""`sdpa_varlen`: PyTorch SDPA that runs each example of a packed row on its own, where no flash-attention is.

transformers packs through flash attention's variable-length kernels (GPUs with flash-attn) or, through SDPA, eager
and flex, by one block-diagonal mask over the whole row: (sum of lengths)^2 scores computed, most of them masked.
This implementation gives every example of a packed row (data.collators.PackedCollator: one row, position ids restarting
at 0) its own causal SDPA call, so the attention costs what the examples cost unpacked, on any device. Everything else
(padded batches, generation with a cache, models that do not pass position ids to attention) goes to transformers'
SDPA unchanged, with the mask transformers builds for it.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from gpt4llm.data.collators import PACKING_ATTENTION, packed_lengths

NAME = "sdpa_varlen"
assert NAME in PACKING_ATTENTION  # so data.sft_datamodule packs for it (batching=auto)


# Every layer of a forward pass gets the same position-ids tensor: its segments are read off once, not once per layer
# (on a GPU each read waits for the device). Holding the tensor keeps its identity from being reused.
_last_segments: tuple[torch.Tensor, list[int] | None] | None = None


def packed_segments(position_ids: torch.Tensor | None, length: int) -> list[int] | None:
    """The example lengths of a single packed row of `length` tokens; None if the batch is not one."""
    global _last_segments
    if position_ids is None or position_ids.dim() != 2 or position_ids.size(0) != 1 or position_ids.size(1) != length:
        return None
    if _last_segments is None or _last_segments[0] is not position_ids:
        lengths = packed_lengths(position_ids[0])
        _last_segments = position_ids, (lengths if len(lengths) > 1 else None)
    return _last_segments[1]


def sdpa_varlen_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    position_ids = kwargs.pop("position_ids", None)
    segments = packed_segments(position_ids, query.size(2)) if query.size(2) == key.size(2) else None
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    # query/key/value: (1, heads, tokens, head_dim); each example attends causally within itself, without a mask.
    outputs = [
        sdpa_attention_forward(module, q, k, v, None, dropout, scaling, is_causal=True, **kwargs)[0]
        for q, k, v in zip(query.split(segments, 2), key.split(segments, 2), value.split(segments, 2))
    ]
    return torch.cat(outputs, dim=1), None  # (1, tokens, heads, head_dim), as transformers' SDPA returns it


def register() -> None:
    """Makes `attn_implementation="sdpa_varlen"` known to transformers (idempotent)."""
    AttentionInterface.register(NAME, sdpa_varlen_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
