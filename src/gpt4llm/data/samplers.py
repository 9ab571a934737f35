"""Samplers whose order is a function of (seed, epoch) alone, sharded over the processes of a run.

Every loader of our data modules takes its order from one of these, and the trainers run with
`use_distributed_sampler: false`, so Lightning never rebuilds a loader with a sampler of its own. That matters twice:
Lightning's replacement did not shuffle at all with torchdata's StatefulDataLoader (it saw no torch RandomSampler),
and a rebuilt loader does not carry the saved position of the one it replaces. The samplers keep their epoch and
how many indices they have yielded in their state, so a run resumed anywhere, across epoch boundaries included,
sees exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import random

from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """The indices of `order(epoch)` that fall to `rank` of `world_size`, as torch's DistributedSampler shards them
    (every world_size-th index, the order padded from its start so each rank gets as many)."""

    def __init__(self, size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of the {world_size} processes")
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.epoch, self._yielded = 0, 0
        self._started = False  # whether an iteration over `epoch` has begun
        self._resume: tuple[int, int] | None = None  # (epoch, yielded) loaded from a checkpoint, not yet iterated

    def order(self, epoch: int) -> list[int]:
        raise NotImplementedError

    def shard_size(self) -> int:
        """The indices of an epoch that fall to each rank."""
        return -(-self.size // self.world_size)

    def __len__(self) -> int:
        return self.shard_size()

    def shard(self, epoch: int) -> list[int]:
        order = self.order(epoch)
        padded = order + order[: self.shard_size() * self.world_size - len(order)]
        return padded[self.rank :: self.world_size]

    def __iter__(self):
        # Decided when the first index is asked for (a generator's body runs then), not when the iterator is made:
        # each iteration that begins is one epoch, the next after the last, or the position a checkpoint held. Not
        # at the end of the shard: Lightning knows an epoch's last batch from the loader's length and never asks for
        # one index more, so the shard's end is never passed (every epoch once drew the first one's order).
        if self._resume is not None:
            (self.epoch, start), self._resume = self._resume, None
        else:
            self.epoch, start = (self.epoch + 1 if self._started else self.epoch), 0
        self._started, self._yielded = True, start
        for index in self.shard(self.epoch)[start:]:
            self._yielded += 1
            yield index

    def state_dict(self) -> dict[str, int]:
        """Where the next index comes from: its epoch and how many of that epoch's indices came before it. A shard
        yielded to its end (a checkpoint at an epoch's last batch) is the next epoch's start."""
        if self._resume is not None:
            epoch, yielded = self._resume
        else:
            epoch, yielded = self.epoch, self._yielded if self._started else 0
        return dict(zip(("epoch", "yielded"), self._position(epoch, yielded)))

    def load_state_dict(self, state: dict[str, int]) -> None:
        # A checkpoint written before state_dict moved a finished shard on is read the same way.
        self._resume = self._position(state["epoch"], state["yielded"])

    def _position(self, epoch: int, yielded: int) -> tuple[int, int]:
        return (epoch + 1, 0) if yielded >= len(self) else (epoch, yielded)


class ShuffledSampler(EpochSampler):
    """A fresh random order every epoch."""

    def order(self, epoch: int) -> list[int]:
        indices = list(range(self.size))
        random.Random(f"{self.seed}-{epoch}").shuffle(indices)
        return indices


class RepeatedBlocksSampler(ShuffledSampler):
    """Online RL's order with several updates per generation (task=grpo|rloo, num_iterations > 1): a fresh random
    order every epoch; each rank's shard cut in blocks of `block` indices (the prompts of one generation: a batch
    times the gradient accumulation), each block yielded `repeats` times in a row, so that the policy takes `repeats`
    optimizer steps on the completions generated once (TRL's RepeatSampler). The shard is padded from its start to
    whole blocks, so that no batch mixes two blocks."""

    def __init__(self, size: int, seed: int, block: int, repeats: int, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(size, seed, rank, world_size)
        self.block, self.repeats = max(1, block), max(1, repeats)

    def __len__(self) -> int:
        return -(-self.shard_size() // self.block) * self.block * self.repeats

    def shard(self, epoch: int) -> list[int]:
        indices = super().shard(epoch)
        blocks = -(-len(indices) // self.block)
        indices = (indices * (1 + blocks * self.block // max(1, len(indices))))[: blocks * self.block]
        cut = [indices[b * self.block : (b + 1) * self.block] for b in range(blocks)]
        return [i for block in cut for _ in range(self.repeats) for i in block]


class InOrderSampler(EpochSampler):
    """The file's order every epoch (evaluation)."""

    def order(self, epoch: int) -> list[int]:
        return list(range(self.size))


class LengthGroupedSampler(EpochSampler):
    """Random batches of examples of similar length, so a padded batch wastes little.

    Each epoch shuffles the examples, sorts each group of `group_batches` batches by length (longest first), cuts
    it into batches and shuffles the batches. Over several processes the unit is one batch for each of them: the
    processes' batches of a step are cut from one sorted run, so each is of similar lengths too.
    """

    def __init__(
        self,
        lengths: list[int],
        batch_size: int,
        seed: int = 0,
        group_batches: int = 64,
        rank: int = 0,
        world_size: int = 1,
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
