"""Callbacks for tests that kill a run mid-way: slow steps (test_ddp_e2e), or a SIGKILL at a step (test_reliability)."""

from __future__ import annotations

import time

import lightning as L


class SlowSteps(L.Callback):
    def __init__(self, seconds: float = 0.4) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)


class DieAt(L.Callback):
    """Kills its own process (SIGKILL: no handler runs, nothing is saved) once `step` optimizer steps are done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
