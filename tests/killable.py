"""A callback for tests/test_ddp_e2e.py: slows training steps down so that a test can kill the process mid-run."""

from __future__ import annotations

import time

import lightning as L


class SlowSteps(L.Callback):
    def __init__(self, seconds: float = 0.4) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)
