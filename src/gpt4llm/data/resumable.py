"""A data module whose training loader resumes mid-epoch: the base of the SFT and the reward-model data modules."""

from __future__ import annotations

from typing import Any

import lightning as L
from torchdata.stateful_dataloader import StatefulDataLoader


class ResumableDataModule(L.LightningDataModule):
    """Subclasses build their cached splits in `build()` and hand each new training loader to `resume()`.

    The loader's position is saved with the data module's state, because Lightning drops the one it saves itself
    when `estimated_stepping_batches` (our LR schedule's length) builds the loader before the restore
    (Lightning-AI/pytorch-lightning#20550). The data module is restored first, so its state is there in time.
    """

    def __init__(self) -> None:
        super().__init__()
        self._train_loader: StatefulDataLoader | None = None
        self._train_loader_state: dict | None = None  # from a checkpoint, applied to the next train loader

    def build(self):
        raise NotImplementedError

    def prepare_data(self) -> None:
        self.build()  # downloads and tokenizes once per node; `setup` then reads the cache on every rank

    def resume(self, loader: StatefulDataLoader) -> StatefulDataLoader:
        """The training loader, moved to where a restored checkpoint left it."""
        self._train_loader = loader
        if self._train_loader_state is not None:
            loader.load_state_dict(self._train_loader_state)
            self._train_loader_state = None
        return loader

    def state_dict(self) -> dict[str, Any]:
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._train_loader_state = state_dict.get("train_loader")
