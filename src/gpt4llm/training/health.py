"""Training health: fp16 loss scaling made visible, and a run whose loss or gradients go NaN/Inf stops loudly.

On GPUs it also logs `train/max_memory_gib` (rank 0's peak allocated memory), the figure `python -m gpt4llm.plan`
predicts.

`train/loss_scale` and `train/skipped_steps` (optimizer steps skipped because fp16 gradients overflowed) come from
Lightning's GradScaler under `16-mixed` (DDP, FSDP, single device) or from the DeepSpeed engine under DeepSpeed fp16;
runs without loss scaling (fp32, bf16) log neither. A scale that keeps falling while skipped steps climb is fp16
running out of range: the run is not learning, even if it has not crashed.

A non-finite loss stops the run before its backward pass, on every rank at once (one rank's NaN is every rank's
problem, and a rank that stopped alone would leave the others waiting in a collective forever). Without loss scaling,
non-finite gradients stop it before the optimizer step. Either way nothing of the bad state is saved: the checkpoints
on disk are the last good ones. (With loss scaling, overflowing gradients are expected now and then: the scaler
skips that step and lowers the scale, which is what `train/skipped_steps` counts.)
"""

from __future__ import annotations

import lightning as L
import torch

from gpt4llm.errors import NonFiniteError


def amp_scaler(trainer):
    """The GradScaler of Lightning's 16-mixed precision plugins (AMP, FSDP), or None."""
    return getattr(trainer.precision_plugin, "scaler", None)


def deepspeed_engine(trainer):
    """The DeepSpeed engine when the strategy is DeepSpeed and fp16 is on, else None."""
    engine = getattr(trainer.strategy, "model", None)
    fp16_enabled = getattr(engine, "fp16_enabled", None)
    try:
        return engine if callable(fp16_enabled) and fp16_enabled() else None
    except Exception:  # an engine from another DeepSpeed version: no fp16 figures rather than a crashed run
        return None


def deepspeed_fp16_state(engine) -> tuple[float, int] | None:
    """(loss scale, skipped steps) of a DeepSpeed engine, read defensively across DeepSpeed versions."""
    optimizer = getattr(engine, "optimizer", None)
    scale = getattr(optimizer, "loss_scale", None)
    if scale is None:
        scale = getattr(optimizer, "cur_scale", None)
    if scale is None:
        scale = getattr(getattr(optimizer, "loss_scaler", None), "cur_scale", None)
    skipped = getattr(engine, "skipped_steps", None)
    if scale is None or skipped is None:
        return None
    return float(scale), int(skipped)


class TrainingHealth(L.Callback):
    def __init__(self, stop_on_nonfinite: bool = True) -> None:
        self.stop_on_nonfinite = stop_on_nonfinite
        self.skipped_steps = 0  # under AMP; DeepSpeed keeps its own count
        self._scale_before_step: float | None = None

    # --- NaN/Inf guard -------------------------------------------------------------------------------------------
    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if self.stop_on_nonfinite:
            self._stop_if(trainer, not bool(torch.isfinite(loss.detach()).all()), "loss")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        scaler = amp_scaler(trainer)
        if scaler is not None and scaler.is_enabled():
            self._scale_before_step = float(scaler.get_scale())  # after unscale_, before the scaler's step/update
            return
        if self.stop_on_nonfinite and not _is_deepspeed(trainer):  # DeepSpeed partitions gradients itself
            # No loss scaler to absorb an overflow: a non-finite gradient would be clipped into NaN weights.
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            bad = bool(grads) and not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
            self._stop_if(trainer, bad, "gradient")

    def _stop_if(self, trainer, bad: bool, what: str) -> None:
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        checkpoint = trainer.checkpoint_callback
        last = (checkpoint.last_model_path or checkpoint.best_model_path) if checkpoint is not None else ""
        raise NonFiniteError(
            f"Non-finite {what} (NaN or Inf) at global step {trainer.global_step} (epoch {trainer.current_epoch}); "
            "stopped before applying it, and nothing of this state was saved. "
            + (
                f"Last good checkpoint: {last} (resume with ckpt_path=...). "
                if last
                else "No checkpoint was saved yet. "
            )
            + "What to try: a lower task.optimizer.lr or a longer warmup (task.warmup_ratio); "
            "trainer.precision=bf16-mixed where the GPU has bf16 (not V100), or 32-true; "
            "keep trainer.gradient_clip_val; "
            "check the data around this step with `python -m gpt4llm.prepare` (empty or huge targets)."
        )

    # --- fp16 loss scale ------------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        state = None
        scaler = amp_scaler(trainer)
        if scaler is not None and scaler.is_enabled():
            if self._scale_before_step is not None:  # None while accumulating: no optimizer step after this batch
                scale = float(scaler.get_scale())
                if scale < self._scale_before_step:  # the scaler lowers the scale exactly when it skipped the step
                    self.skipped_steps += 1
                self._scale_before_step = None
                state = scale, self.skipped_steps
        else:
            engine = deepspeed_engine(trainer)
            state = deepspeed_fp16_state(engine) if engine is not None else None
        if state is not None:
            pl_module.log("train/loss_scale", state[0], rank_zero_only=True)
            pl_module.log("train/skipped_steps", float(state[1]), rank_zero_only=True)
        if pl_module.device.type == "cuda":  # rank 0's peak, to hold against `python -m gpt4llm.plan`
            peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            pl_module.log("train/max_memory_gib", peak, rank_zero_only=True)

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps}  # a resumed run keeps counting from where it stopped

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped_steps = state_dict.get("skipped_steps", 0)


def _is_deepspeed(trainer) -> bool:
    from lightning.pytorch.strategies import (
        DeepSpeedStrategy,  # the class only: deepspeed itself is not imported
    )

    return isinstance(trainer.strategy, DeepSpeedStrategy)
