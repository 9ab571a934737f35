"""fp16 health is logged; a NaN/Inf loss or gradient stops the run and leaves the last good checkpoint."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision

from gpt4llm.errors import NonFiniteError
from gpt4llm.training.health import TrainingHealth, deepspeed_fp16_state
from helpers.configs import compose_train, demo_overrides


class InfGrad(torch.autograd.Function):
    """Identity forward, Inf gradient backward: an fp16 overflow in the backward pass, with a finite loss."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class Toy(L.LightningModule):
    def __init__(self, bad_steps=(), bad="grad"):
        super().__init__()
        self.layer = torch.nn.Linear(8, 1)
        self.bad_steps, self.bad = set(bad_steps), bad

    def training_step(self, batch, batch_idx):
        out = self.layer(batch[0])
        if self.global_step in self.bad_steps:
            out = InfGrad.apply(out) if self.bad == "grad" else out * float("nan")
        loss = (out.float() - batch[1]).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g))
        return torch.utils.data.DataLoader(data, batch_size=8)


def fit(module, tmp_path, **kwargs):
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=6,
        logger=CSVLogger(tmp_path, name="", version=""),
        log_every_n_steps=1,
        callbacks=[TrainingHealth()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
    trainer.fit(module)
    return trainer


def test_loss_scale_and_skipped_steps_are_logged_under_fp16(tmp_path):
    # Lightning's own 16-mixed plugin with a GradScaler, on CPU (the Trainer turns 16-mixed into bf16 on CPU)
    precision = MixedPrecision(
        "16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=1000)
    )
    fit(Toy(bad_steps={2}), tmp_path, plugins=[precision])
    rows = [r for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r.get("train/loss_scale")]
    scales = [float(r["train/loss_scale"]) for r in rows]
    skipped = [float(r["train/skipped_steps"]) for r in rows]
    assert scales == [256.0] * 2 + [128.0] * 4  # the overflow at step 2 halved the scale...
    assert skipped == [0, 0, 1, 1, 1, 1]  # ...and the scaler skipped that step


def test_deepspeed_engine_figures_are_read_defensively():
    stage3 = SimpleNamespace(optimizer=SimpleNamespace(loss_scale=1024.0), skipped_steps=3)
    assert deepspeed_fp16_state(stage3) == (1024.0, 3)
    older = SimpleNamespace(optimizer=SimpleNamespace(loss_scaler=SimpleNamespace(cur_scale=512.0)), skipped_steps=0)
    assert deepspeed_fp16_state(older) == (512.0, 0)
    assert deepspeed_fp16_state(SimpleNamespace(optimizer=None)) is None  # nothing to log, no crash


def test_nonfinite_gradients_stop_an_unscaled_run_before_the_step(tmp_path):
    module = Toy(bad_steps={3})
    with pytest.raises(NonFiniteError, match="Non-finite gradient .* at global step 3"):
        fit(module, tmp_path)
    assert all(torch.isfinite(p).all() for p in module.parameters())  # the bad step was never applied


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import gpt4llm.models.sft_module as sft
    from gpt4llm.train import train

    real_loss, calls = sft.SFTModule.loss, []

    def loss_going_nan(self, batch):
        loss, tokens = real_loss(self, batch)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 6 else loss), tokens  # the 6th training batch: step 5

    monkeypatch.setattr(sft.SFTModule, "loss", loss_going_nan)
    cfg = compose_train(
        demo_overrides(
            tmp_path,
            "trainer.max_steps=8",
            "validate_first=false",
            "callbacks.checkpoint.every_n_train_steps=2",
            "callbacks.exact_match=null",
        )
    )
    cfg.paths.output_dir = str(tmp_path / "run")
    (tmp_path / "run").mkdir()
    with pytest.raises(
        NonFiniteError, match=r"Non-finite loss .* at global step 5 .*Last good checkpoint: .*last\.ckpt"
    ) as err:
        train(cfg)
    assert "lower task.optimizer.lr" in str(err.value)

    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step4.ckpt"]
    last = torch.load(checkpoints / "last.ckpt", weights_only=False)
    assert last["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert not (tmp_path / "run" / "export").exists()
