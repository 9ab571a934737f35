"""The progress bar counts what the run will train (a 10-step run once showed 10/191 and a 31-minute ETA) and shows
a few short metrics (the full names wrapped it at 80 and 120 columns)."""

from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel

from gpt4llm.training.progress import ProgressBar


class LoggingModel(BoringModel):
    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        for name in ("train/loss", "train/lr", "train/tokens_per_s", "val/loss", "val/exact_match"):
            self.log(name, 1.234567, prog_bar=True)
        return out


class Totals(L.Callback):
    def __init__(self):
        self.totals, self.metrics = [], {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        bar = trainer.progress_bar_callback
        self.totals.append(bar.train_progress_bar.total)
        self.metrics = bar.get_metrics(trainer, pl_module)


@pytest.mark.parametrize("accumulation, batches", [(1, 3), (2, 6)])
def test_the_bar_counts_to_max_steps(accumulation, batches, tmp_path):
    totals = Totals()
    trainer = L.Trainer(
        max_steps=3,
        max_epochs=3,  # as the configs have it: Lightning's own bar then counts the whole epoch
        accumulate_grad_batches=accumulation,
        callbacks=[ProgressBar(), totals],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    trainer.fit(LoggingModel())  # 64 batches an epoch
    assert totals.totals and set(totals.totals) == {batches}
    assert totals.metrics == {"loss": "1.23", "lr": "1.23", "tokens_per_s": "1.23", "val_loss": "1.23"}


@pytest.mark.parametrize("logger, says_tensorboard", [("tensorboard", True), ("csv", False)])
def test_the_summary_names_tensorboard_only_where_it_logged(logger, says_tensorboard, tmp_path, capsys):
    """A W&B or MLflow run once printed a `tensorboard --logdir` line for a directory with no TensorBoard files."""
    from gpt4llm.train import train
    from helpers.configs import compose_train, demo_overrides

    overrides = demo_overrides(tmp_path, f"logger={logger}", "trainer.max_steps=1", "data.exact_match_examples=0")
    cfg = compose_train([*overrides, "export=false"])
    cfg.paths.output_dir = str(tmp_path / "run")
    train(cfg)
    assert ("TensorBoard:  tensorboard --logdir" in capsys.readouterr().out) == says_tensorboard


def test_a_slow_step_gets_a_time_left_after_the_first_one(tmp_path):
    """Slow steps (minutes each on a 7B model) once showed no time left: the bar estimates from the first step on."""
    import time

    class Slow(BoringModel):
        def training_step(self, batch, batch_idx):
            time.sleep(0.3)
            return super().training_step(batch, batch_idx)

    shown = []

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            shown.append(str(trainer.progress_bar_callback.train_progress_bar))

    trainer = L.Trainer(
        max_steps=3,
        max_epochs=2,
        callbacks=[ProgressBar(), Probe()],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    trainer.fit(Slow())
    assert "1/3 [00:00<00:00" in shown[0] and "?" not in shown[0].split("[")[1], shown[0]
