"""The training progress bar: Lightning's tqdm bar, counting what this run will train and showing a few metrics.

Lightning's bar counts a whole epoch even when `trainer.max_steps` ends the run long before (10/191 with an ETA of 31
minutes for a 10-step run), and shows every metric logged to it under its full name, which wraps the bar at 80 and
120 columns."""

from __future__ import annotations

import math

from lightning.pytorch.callbacks import TQDMProgressBar

SHOWN = 4  # metrics on the bar; TensorBoard has every one


class ProgressBar(TQDMProgressBar):
    @property
    def total_train_batches(self) -> int | float:
        """The epoch's batches, cut to what is left before `max_steps` (in batches: optimizer steps times the
        gradient accumulation), counting the batches this epoch already trained (a resumed run starts mid-epoch)."""
        trainer = self.trainer
        total = trainer.num_training_batches  # Lightning's own bar cuts it only when max_epochs is unset
        if trainer.max_steps is None or trainer.max_steps < 0 or math.isinf(total):
            return total
        done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        left = (trainer.max_steps - trainer.global_step) * trainer.accumulate_grad_batches
        return min(total, done + max(left, 0))

    def get_metrics(self, trainer, pl_module) -> dict[str, int | str | float | dict[str, float]]:
        """The first few metrics logged to the bar, by their short names (loss, val/loss -> val_loss), to three
        significant figures; no `v_num`."""
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        shown = {}
        for name, value in list(metrics.items())[:SHOWN]:
            short = name.removeprefix("train/").replace("/", "_")
            shown[short] = f"{value:.3g}" if isinstance(value, float) else value
        return shown
