"""Model FLOPs of training a decoder-only transformer: what `plan` estimates with and `train/mfu` measures against.

6 FLOPs per parameter per token (forward 2, backward 4) on every weight but the embedding lookup (a tied lm_head
still multiplies), plus attention's scores and weighted sum, 12 x layers x hidden per token per token of context
(PaLM, appendix B). Recomputation under gradient checkpointing is not counted: it is not useful work.
"""

from __future__ import annotations

from collections.abc import Iterable


def training_flops(matmul_params: int, num_layers: int, hidden_size: int, lengths: Iterable[int]) -> float:
    """FLOPs of one training step on examples of these lengths (real tokens only: padding is not useful work)."""
    lengths = [int(n) for n in lengths]
    return 6.0 * matmul_params * sum(lengths) + 12.0 * num_layers * hidden_size * sum(n * n for n in lengths)


def matmul_parameters(model) -> int:
    """Parameters that take part in a matrix multiply per token: all but the input embedding, unless it is tied to
    the output layer. Full sizes under DeepSpeed ZeRO-3, whose partitioned parameters keep theirs in `ds_numel`."""

    def numel(p) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    total = sum(numel(p) for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding
    return total - (0 if tied else numel(embedding))


def available_flops(device, precision: str) -> float | None:
    """The device's dense peak for the trainer's precision (Lightning's table of GPUs); None where unknown (CPUs)."""
    import torch
    from lightning.fabric.utilities.throughput import get_available_flops

    if device.type != "cuda":
        return None
    dtype = (
        torch.bfloat16
        if precision.startswith("bf16")
        else torch.float16
        if precision.startswith("16")
        else torch.float32
    )
    return get_available_flops(device, dtype)
