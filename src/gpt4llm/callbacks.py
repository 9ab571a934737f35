"""Callbacks that report what Lightning's built-ins do not: real-token throughput and held-out exact match."""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from gpt4llm.generation import generate_responses


class TokenThroughput(L.Callback):
    """`train/tokens_per_s`: non-pad tokens per second of training-step wall time, across all devices."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        elapsed = time.perf_counter() - self._start
        tokens = batch["attention_mask"].sum() * trainer.world_size
        pl_module.log("train/tokens_per_s", tokens / max(elapsed, 1e-9), prog_bar=True)


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
