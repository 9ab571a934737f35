"""Callbacks that report what Lightning's built-ins do not: real-token throughput and MFU, held-out exact match."""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from gpt4llm.data.collators import packed_lengths
from gpt4llm.models.decoding import generate_texts
from gpt4llm.training.flops import available_flops, matmul_parameters, training_flops


class TokenThroughput(L.Callback):
    """`train/tokens_per_s`: real (non-pad) tokens per second across all devices; `train/pad_fraction`: the share of
    the tokens computed that were padding; `train/mfu`: model FLOPs utilisation, the useful FLOPs per second of
    each device (gpt4llm.training.flops: real tokens only) over its dense peak for the trainer's precision.

    The peak comes from Lightning's table of GPUs, or from `peak_tflops` (per device) for a device it does not
    know or a measured peak; without either (CPUs) `train/mfu` is not logged. Time runs from one batch's end to
    the next, so data loading and the optimizer step count as well.
    """

    def __init__(self, peak_tflops: float | None = None) -> None:
        self.peak_tflops = peak_tflops

    def on_train_start(self, trainer, pl_module) -> None:
        self._last = time.perf_counter()  # a run resumed in mid-epoch does not start that epoch again
        model = pl_module.model
        peak = (
            self.peak_tflops * 1e12 if self.peak_tflops else available_flops(pl_module.device, str(trainer.precision))
        )
        config = model.config
        self._mfu = None
        if peak and hasattr(config, "num_hidden_layers") and hasattr(config, "hidden_size"):
            self._mfu = (matmul_parameters(model), config.num_hidden_layers, config.hidden_size, peak)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        elapsed, self._last = max(now - self._last, 1e-9), now
        lengths = example_lengths(batch)
        real, computed = int(lengths.sum()), batch["input_ids"].numel()
        pl_module.log("train/tokens_per_s", real * trainer.world_size / elapsed, prog_bar=True)
        pl_module.log("train/pad_fraction", 1 - real / computed)
        if self._mfu:
            params, layers, hidden, peak = self._mfu
            flops = training_flops(params, layers, hidden, lengths.tolist())
            pl_module.log("train/mfu", flops / elapsed / peak, prog_bar=True)  # this rank's batch: one device's share


def example_lengths(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Real tokens of each example in a batch: padded rows by their attention mask, packed rows (data.collators.
    PackedCollator) by where their position ids restart."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum(dim=1)
    if "position_ids" in batch:
        return torch.tensor(packed_lengths(batch["position_ids"].flatten()))
    return torch.full((batch["input_ids"].size(0),), batch["input_ids"].size(1))


class ExactMatch(L.Callback):
    """`val/exact_match`: share of held-out records whose greedy response equals the reference output.

    The data module says how many records (its `exact_match_examples`): only datasets with exact answers, like
    the demo, turn it on.
    """

    def __init__(self, max_new_tokens: int = 32, batch_size: int = 64) -> None:
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        source = getattr(trainer.datamodule, "exact_match_records", None)  # only instruction data has answers
        records = source() if source and not trainer.sanity_checking else []
        if not records:
            return
        template = getattr(trainer.datamodule, "template", "alpaca")
        responses = generate_texts(
            pl_module.model,
            pl_module.tokenizer,
            [r["prompt"] for r in records],
            self.max_new_tokens,
            self.batch_size,
            add_special_tokens=template == "alpaca",
        )
        hits = sum(r.strip() == rec["output"].strip() for r, rec in zip(responses, records))
        pl_module.log("val/exact_match", hits / len(records), prog_bar=True)
        rank_zero_info(f"Exact match on {len(records)} held-out records: {hits}/{len(records)}")
