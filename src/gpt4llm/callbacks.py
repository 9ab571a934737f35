"""Callbacks that report what Lightning's built-ins do not: real-token throughput and held-out exact match."""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from gpt4llm.generation import generate_responses


class TokenThroughput(L.Callback):
    """`train/tokens_per_s`: real (non-pad) tokens per second across all devices, and `train/pad_fraction`: the share
    of the tokens computed that were padding.

    Time runs from one batch's end to the next, so data loading and the optimizer step count as well.
    """

    def on_train_start(self, trainer, pl_module) -> None:
        self._last = time.perf_counter()  # a run resumed in mid-epoch does not start that epoch again

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        computed = batch["input_ids"].numel()
        real = batch["attention_mask"].sum() if "attention_mask" in batch else computed  # packed rows have no pads
        pl_module.log("train/tokens_per_s", real * trainer.world_size / max(elapsed, 1e-9), prog_bar=True)
        pl_module.log("train/pad_fraction", 1 - real / computed)


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
        responses = generate_responses(
            pl_module.model, pl_module.tokenizer, records, self.max_new_tokens, self.batch_size
        )
        hits = sum(r.strip() == rec["output"].strip() for r, rec in zip(responses, records))
        pl_module.log("val/exact_match", hits / len(records), prog_bar=True)
        rank_zero_info(f"Exact match on {len(records)} held-out records: {hits}/{len(records)}")
