"""The base of the SFT and the reward-model data modules: cached splits built once per node, and the number of
training batches known without building the training loader."""

from __future__ import annotations

import math

import lightning as L
import torch
from datasets import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from gpt4llm.data.samplers import EpochSampler, InOrderSampler, ShuffledSampler


class SplitsDataModule(L.LightningDataModule):
    """Subclasses build their cached splits (`self.splits`) in `build()` and batch `batch_size` examples.

    Loaders take their order from gpt4llm.data.samplers, sharded over the run's processes here (the trainers run
    with `use_distributed_sampler: false`). The training loaders are torchdata's StatefulDataLoader: Lightning saves their position in each checkpoint and
    restores it before the first batch of a resumed run, so a run resumed mid-epoch continues with the very batches
    it would have seen. That holds as long as nothing builds the loader before the checkpoint is restored (Lightning
    then drops the position, Lightning-AI/pytorch-lightning#20550, and DeepSpeed restores only after setup): the LR
    schedule's length comes from `batches_per_epoch`, not from `trainer.estimated_stepping_batches`.
    """

    batch_size: int
    num_workers: int = 0

    def build(self):
        raise NotImplementedError

    def prepare_data(self) -> None:
        self.build()  # downloads and tokenizes once per node; `setup` then reads the cache on every rank

    def batches_per_epoch(self, world_size: int) -> int:
        """Training batches per device per epoch: the split, sharded as Lightning's DistributedSampler does (padded to
        equal shards), in batches of `batch_size` (the last one partial); call after `setup`."""
        return math.ceil(math.ceil(len(self.splits["train"]) / world_size) / self.batch_size)

    def shard(self) -> dict[str, int]:
        """This process's place in the run (one process when not training, e.g. `prepare`)."""
        trainer = self.trainer  # Lightning's attribute; None until the data module is given to a trainer
        return {"rank": trainer.global_rank, "world_size": trainer.world_size} if trainer is not None else {}

    def shuffled(self, split: Dataset, seed: int) -> ShuffledSampler:
        return ShuffledSampler(len(split), seed, **self.shard())

    def in_order(self, split: Dataset) -> InOrderSampler:
        return InOrderSampler(len(split), **self.shard())

    def loader(self, split: Dataset, sampler: EpochSampler, batch_size: int, collate) -> StatefulDataLoader:
        return StatefulDataLoader(
            split,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )
