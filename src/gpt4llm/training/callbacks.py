"""Callbacks that report what Lightning's built-ins do not: real-token throughput and MFU, held-out exact match, the
step of the last validation; and what a checkpoint must hold beyond Lightning's state for a resume to be the run it
resumes: the run's settings and every process's random generators."""

from __future__ import annotations

import logging
import math
import random
import time
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from gpt4llm.data.collators import packed_lengths
from gpt4llm.models.decoding import generate_texts
from gpt4llm.training.flops import available_flops, matmul_parameters, training_flops
from gpt4llm.training.resume import (
    DATA,
    LR,
    data_digest,
)

log = logging.getLogger(__name__)


class TokenThroughput(L.Callback):
    """`train/tokens_per_s`: real (non-pad) tokens per second across all devices; `train/pad_fraction`: the share of
    the tokens computed that were padding; `train/mfu`: model FLOPs utilisation, the useful FLOPs per second of
    each device (gpt4llm.training.flops: real tokens only) over its dense peak for the trainer's precision.

    The peak comes from Lightning's table of GPUs, or from `peak_tflops` (per device) for a device it does not
    know or a measured peak; without either (CPUs) `train/mfu` is not logged. Time runs from one batch's end to
    the next, so data loading and the optimizer step count as well.
    """

    def __init__(self, peak_tflops: float | None = None) -> None:
        self.peak_tflops = peak_tflops

    def on_train_start(self, trainer, pl_module) -> None:
        self._last = time.perf_counter()  # a run resumed in mid-epoch does not start that epoch again
        model = pl_module.model
        peak = (
            self.peak_tflops * 1e12 if self.peak_tflops else available_flops(pl_module.device, str(trainer.precision))
        )
        config = model.config
        self._mfu = None
        if peak and hasattr(config, "num_hidden_layers") and hasattr(config, "hidden_size"):
            self._mfu = (matmul_parameters(model), config.num_hidden_layers, config.hidden_size, peak)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        elapsed, self._last = max(now - self._last, 1e-9), now
        # online RL trains on sequences it made from a batch of prompts (models.rl_module): those are what it computed
        batch = getattr(pl_module, "trained_batch", None) or batch
        lengths = example_lengths(batch)
        real, computed = int(lengths.sum()), batch["input_ids"].numel()
        pl_module.log("train/tokens_per_s", real * trainer.world_size / elapsed, prog_bar=True)
        pl_module.log("train/pad_fraction", 1 - real / computed)
        if self._mfu:
            params, layers, hidden, peak = self._mfu
            flops = training_flops(params, layers, hidden, lengths.tolist())
            pl_module.log("train/mfu", flops / elapsed / peak, prog_bar=True)  # this rank's batch: one device's share


def example_lengths(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Real tokens of each example in a batch: padded rows by their attention mask, packed rows (data.collators.
    PackedCollator) by where their position ids restart."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum(dim=1)
    if "position_ids" in batch:
        return torch.tensor(packed_lengths(batch["position_ids"].flatten()))
    return torch.full((batch["input_ids"].size(0),), batch["input_ids"].size(1))


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
        responses = generate_texts(
            pl_module.model,
            pl_module.tokenizer,
            [r["prompt"] for r in records],
            self.max_new_tokens,
            self.batch_size,
            add_special_tokens=trainer.datamodule.prompt_format.add_special_tokens,
        )
        hits = sum(r.strip() == rec["output"].strip() for r, rec in zip(responses, records))
        pl_module.log("val/exact_match", hits / len(records), prog_bar=True)
        rank_zero_info(f"Exact match on {len(records)} held-out records: {hits}/{len(records)}")


class LastValidation(L.Callback):
    """The global step of the last validation (`step`; None before any, the sanity check counts), so that `train`
    can tell whether fit stopped between two validations and validate the final model. The module carries it too,
    as `validated_at_step`, for what holds the module alone."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.step = pl_module.validated_at_step = trainer.global_step


class ValidationCost(L.Callback):
    """Validation's time beside training's: a warning as soon as validation is on course to take longer than training
    (a 10-step run with 200 held-out conversations once spent 20 of its 23 minutes validating), and the share at the
    end (`summary`), which `train` prints."""

    def __init__(self) -> None:
        self.validating = self.training = 0.0
        self.validations = self.batches = 0
        self._started: float | None = None
        self._warned = False

    def on_validation_start(self, trainer, pl_module) -> None:
        self._started = None if trainer.sanity_checking else time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._started is not None:
            self.validating += time.perf_counter() - self._started
            self.validations += 1
            self._warn_once(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._started is not None:
            self.training += time.perf_counter() - self._started
            self.batches += 1
            if self.batches == 3:  # a first rate, past the first batch's warm-up
                self._warn_once(trainer)

    def _warn_once(self, trainer) -> None:
        if self._warned or not (self.validations and self.batches):
            return
        planned = planned_batches(trainer)
        if planned is None:
            return
        self._warned = True
        epochs = math.ceil(planned / max(trainer.num_training_batches, 1))
        validation = self.validating / self.validations * (epochs + 1)  # each epoch's, and one before or after
        training = self.training / self.batches * planned
        if validation > training:
            log.warning(
                f"Validation will take about {validation / 60:.1f} min of this run against {training / 60:.1f} min "
                f"of training: hold out fewer records (data.val_size, auto holds out 5%), validate less often "
                f"(trainer.check_val_every_n_epoch), or validate_first=false"
            )

    def summary(self) -> str | None:
        total = self.validating + self.training
        if not self.validations or not total:
            return None
        return (
            f"{self.validating:.0f} s of {total:.0f} s training and validating ({100 * self.validating / total:.0f}%)"
        )


def planned_batches(trainer) -> int | None:
    """The training batches this run will take: the epochs' batches, cut by max_steps (optimizer steps times the
    gradient accumulation); None when neither bounds it."""
    per_epoch = trainer.num_training_batches
    bounds = []
    if trainer.max_epochs is not None and trainer.max_epochs > 0 and not math.isinf(per_epoch):
        bounds.append(per_epoch * trainer.max_epochs)
    if trainer.max_steps is not None and trainer.max_steps > 0:
        bounds.append(trainer.max_steps * trainer.accumulate_grad_batches)
    return min(bounds) if bounds else None


class RecordedSettings(L.Callback):
    """Records in every checkpoint what the run trains on and how (`settings`: gpt4llm.training.resume.run_settings,
    which `train` sets before fit, plus the training data's digest, taken at setup where `train` has not read it).
    `train` compares them with a resumed checkpoint's before anything is written (resume.check_resume: a resume that
    would train another run stops in one line).

    The learning rate is the one recorded setting a resume may change (a run that diverged goes on at a lower rate):
    the LR schedule goes on from the checkpoint's step with `task.optimizer.lr` as its peak, said in the log, and
    later checkpoints record the new rate."""

    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        self.settings = dict(settings or {})
        self._resumed_lr: float | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and DATA not in self.settings and (digest := data_digest(trainer.datamodule)) is not None:
            self.settings[DATA] = digest

    def state_dict(self) -> dict[str, Any]:
        return {"settings": self.settings}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resumed_lr = (state_dict.get("settings") or {}).get(LR)  # the rest was compared before fit

    def on_train_start(self, trainer, pl_module) -> None:
        # after Lightning restored the optimizer and the schedule, whose base rates are the checkpoint's
        old, new, self._resumed_lr = self._resumed_lr, self.settings.get(LR), None
        if not old or not new or float(old) == float(new):
            return
        scale_learning_rate(trainer, float(new) / float(old))
        rank_zero_info(
            f"{LR}={new:g} on resume (the checkpoint's run had {old:g}): the LR schedule goes on from step "
            f"{trainer.global_step} with the new peak rate"
        )


def scale_learning_rate(trainer, ratio: float) -> None:
    """Every learning rate of the run's optimizers times `ratio`: the current ones, and the base rates the schedules
    compute them from (transformers' schedules multiply the base rate by a factor of the step), each once."""
    groups = {}
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        scheduler.base_lrs = [lr * ratio for lr in scheduler.base_lrs]
        if getattr(scheduler, "_last_lr", None):
            scheduler._last_lr = [lr * ratio for lr in scheduler._last_lr]
        groups.update((id(g), g) for g in scheduler.optimizer.param_groups)
    for optimizer in trainer.optimizers:
        groups.update((id(g), g) for g in optimizer.param_groups)
    for group in groups.values():
        group["lr"] *= ratio
        if "initial_lr" in group:
            group["initial_lr"] *= ratio


class RandomState(L.Callback):
    """Every process's random generators (Python's, NumPy's, torch's on the CPU and on its GPU) in each checkpoint,
    put back before the first batch a resumed run trains on: dropout (a LoRA adapter's, a model's own) then draws the
    masks the uninterrupted run drew. Lightning saves none of them. Put back at that batch, not when the checkpoint is
    read, so that nothing a resumed run does before it (building loaders, validating) moves them; for the same reason
    our data modules' loaders draw their worker seeds from a generator of their own (data.base_datamodule).

    Each process's own generators: the checkpoint holds one set per process (gathered when it is written) and each
    takes back its own; a checkpoint from another number of processes is refused before (resume.check_resume)."""

    def __init__(self) -> None:
        self._loaded: list[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        import torch.distributed as dist

        states = random_states()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, states)  # every rank writes its checkpoint state at once
            return {"processes": gathered}
        return {"processes": [states]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict.get("processes")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._loaded is None:
            return
        states, self._loaded = self._loaded, None
        if len(states) != trainer.world_size:
            log.warning(
                f"the checkpoint holds random states of {len(states)} processes, this run has "
                f"{trainer.world_size}: they are not restored"
            )
            return
        set_random_states(states[trainer.global_rank])


def random_states() -> dict[str, Any]:
    """This process's generators as plain values and tensors (what torch.load's weights_only reads back)."""
    name, keys, position, has_gauss, gauss = np.random.get_state(legacy=True)
    version, python_state, python_gauss = random.getstate()
    return {
        "python": [version, list(python_state), python_gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }


def set_random_states(states: dict[str, Any]) -> None:
    version, python_state, python_gauss = states["python"]
    random.setstate((version, tuple(python_state), python_gauss))
    name, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
