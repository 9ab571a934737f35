"""Resuming a run: where its checkpoint stands, read without loading the weights; one process training in a run
directory at a time; and what a checkpoint records of its run, so that a resume that would train something else
stops instead of going on quietly."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from gpt4llm.errors import CheckpointError, MissingFileError

log = logging.getLogger(__name__)


def checkpoint_step(path: str | Path) -> int:
    """The global step a Lightning checkpoint was saved at."""
    return int(_lightning_state(path)["global_step"])


def recorded_settings(path: str | Path) -> dict[str, Any] | None:
    """What a checkpoint records of its run (RecordedSettings' state); None for one written before it did."""
    state = (_lightning_state(path).get("callbacks") or {}).get("RecordedSettings") or {}
    return state.get("settings")


def _lightning_state(path: str | Path) -> dict[str, Any]:
    """Lightning's state in a checkpoint: a file, or the directory DeepSpeed or FSDP2 writes (whose model states
    file or meta.pt holds Lightning's state). Memory-mapped: a 7B checkpoint is not read in."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(
            f"ckpt_path={path}: no such checkpoint (a run's checkpoints are <run>/checkpoints/*.ckpt)"
        )
    if path.is_dir():
        # FSDP2's sharded checkpoint keeps Lightning's state in meta.pt beside the shards
        states = [path / "meta.pt"] if (path / "meta.pt").is_file() else sorted(path.glob("*/*model_states.pt"))
        if not states:
            raise MissingFileError(
                f"ckpt_path={path}: a directory, but not a DeepSpeed checkpoint (no */*model_states.pt) nor a "
                "sharded FSDP2 one (no meta.pt)"
            )
        path = states[0]
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # not a torch file at all: pickle's, zipfile's and torch's many errors
        state = err
    if not isinstance(state, dict) or "global_step" not in state:
        raise CheckpointError(
            f"ckpt_path={path}: not a Lightning checkpoint (a run's checkpoints are <run>/checkpoints/*.ckpt)"
        )
    return state


# --- one training per run directory ----------------------------------------------------------------------------------
RUN_LOCK = "run.lock"
# The variables by which launchers tell a process its place: torchrun and DeepSpeed's launcher (RANK, LOCAL_RANK,
# GROUP_RANK), srun (SLURM_PROCID), Lightning's own launcher (its children's LOCAL_RANK and NODE_RANK; the process
# that launches them has none), MPI.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "GROUP_RANK", "NODE_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def leads_launch(env: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is the first of its launch (global rank 0), or a launch's only process: every rank of a
    multi-process run shares one run directory, and the first holds its lock for them all."""
    return all(env.get(name, "0") in ("", "0") for name in RANK_VARIABLES)


@contextmanager
def run_directory_lock(directory: str | Path, env: Mapping[str, str] = os.environ) -> Iterator[None]:
    """One training per run directory: two runs with one GPT4LLM_RUN_ID, or two resumes of one checkpoint, would
    write each other's checkpoints, TensorBoard events and export. The first process of a launch holds
    `<directory>/run.lock` (gpt4llm.io.study_lock: its pid, host, start time and command; the kernel drops it when the
    process dies, even by SIGKILL) while it trains; another stops at once with LockHeld naming the holder. A lock left
    by a dead holder is taken over (said in the log), and a released one is removed."""
    from gpt4llm.io.study_lock import describe, study_lock

    if not leads_launch(env):
        yield
        return
    argv = list(sys.argv)
    if argv and argv[0].endswith(os.path.join("gpt4llm", "train.py")):
        argv[0] = "python -m gpt4llm.train"  # how it was started, not the module's path
    with study_lock(
        directory,
        RUN_LOCK,
        action="train in this run directory",
        command=" ".join(argv),
        advice=(
            "two trainings in one directory would overwrite each other's checkpoints and export. Wait for it to end "
            "or stop it (kill <pid>), or train elsewhere (another GPT4LLM_RUN_ID or hydra.run.dir)"
        ),
        remove=True,
    ) as stale:
        if stale:
            log.warning(f"{directory}: took over the run directory's lock from {describe(stale)}, no longer running")
        yield


# --- what a checkpoint records of its run ----------------------------------------------------------------------------
# Beyond its weights, optimizer state and place in the data and the LR schedule (Lightning's own), a checkpoint
# records what its run trains on and how (training.callbacks.RecordedSettings), each under the key that sets it. A
# resume with another value of any of them stops, naming the key and both values: with other data, another split or
# order it would skip or repeat samples; with another task, template, adapter or schedule it would be another run
# under the first one's name. What may change: README, Sweeps, resume.
RECORDED = (
    "data.template",
    "data.train_on",
    "data.pairing",
    "data.split",
    "data.max_length",
    "data.val_size",
    "data.split_seed",
    "data.skip_invalid",
    "data.shuffle_seed",
    "data.packed",
    "data.batch_size",
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.limit_train_batches",
    "task.optimizer.betas",
    "task.optimizer.eps",
    "task.optimizer.weight_decay",
    "task.lr_scheduler",
    "task.warmup_ratio",
    "task.loss",
    "task.beta",
    "task.label_smoothing",
    "task.reference",
    "task.reference_path",
    "peft.method",
    "peft.r",
    "peft.lora_alpha",
    "peft.lora_dropout",
    "peft.target_modules",
    "peft.bias",
    "peft.use_rslora",
    "peft.use_dora",
    "peft.quantization",
)
LR = "task.optimizer.lr"  # recorded, and honoured when a resume changes it (not compared)
# Recorded from the running trainer and data (RecordedSettings.setup), not from the config
DATA, TASK, BATCHING = "data", "task", "data.batching"
WORLD, ACCUMULATION = "processes (trainer.devices x trainer.num_nodes)", "trainer.accumulate_grad_batches"
_MISSING = object()


def run_settings(cfg: DictConfig, trainer=None, datamodule=None) -> dict[str, Any]:
    """The recorded settings as this config sets them (plain values, as a checkpoint stores them), the task by its
    module's class; with the trainer and the data module (before fit), also the number of processes, the gradient
    accumulation and the batching the data module chose. Not the data's digest: check_resume and RecordedSettings
    add it."""
    settings: dict[str, Any] = {TASK: str(cfg.task._target_).rsplit(".", 1)[-1]}
    for key in (*RECORDED, LR):
        value = OmegaConf.select(cfg, key, default=_MISSING)
        if value is not _MISSING:
            settings[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    if getattr(datamodule, "batching", None) is not None:
        settings[BATCHING] = datamodule.batching  # data.batching=auto, decided
    if trainer is not None:
        settings[WORLD], settings[ACCUMULATION] = trainer.world_size, trainer.accumulate_grad_batches
    return settings


def data_digest(datamodule) -> dict[str, str] | None:
    """The training data by its bytes: the file (or save_to_disk directory) a data module of ours read, and its
    SHA-256. None for a data module that reports no file."""
    report = getattr(datamodule, "report", None) or {}
    if not report.get("file") or not Path(report["file"]).exists():
        return None
    return data_digest_of(Path(report["file"]))


def data_digest_of(path: Path) -> dict[str, str]:
    from gpt4llm.data.cache import file_sha256

    return {"file": str(path), "sha256": file_sha256(path)}


def check_resume(ckpt_path: str | Path, settings: dict[str, Any], datamodule) -> dict[str, Any]:
    """Before a resumed run writes anything (a TensorBoard event file, a checkpoint): stops when `settings`
    (run_settings) or the training data differ from what the checkpoint recorded (check_settings). Returns the
    settings with the data's digest, for RecordedSettings to record without reading the data again."""
    theirs = recorded_settings(ckpt_path)
    if theirs is None:
        log.info(f"ckpt_path={ckpt_path}: written before checkpoints recorded their run's settings: not compared")
        return settings
    if DATA in theirs:
        digest = data_digest_of(datamodule.source_file())
        settings = {TASK: settings.get(TASK), DATA: digest, **settings}
    check_settings(theirs, settings)
    return settings


def check_settings(theirs: dict[str, Any], ours: dict[str, Any]) -> None:
    """Stops (CheckpointError, one line naming the key and both values) when this run's recorded settings differ from
    the checkpoint's, other than the learning rate; the first difference is named, and how many more there are. A
    setting only one of them records (one a later version added) is not compared."""
    differ = [k for k in ours if k in theirs and k != LR and _differs(theirs[k], ours[k])]
    if not differ:
        return
    key, more = differ[0], differ[1:]
    also = f" (and {len(more)} more: {', '.join(more)})" if more else ""
    if key == DATA:
        a, b = theirs.get(DATA) or {}, ours.get(DATA) or {}
        raise CheckpointError(
            f"ckpt_path: the checkpoint's run trained on {a.get('file')} (sha256 {str(a.get('sha256'))[:12]}), this "
            f"run reads {b.get('file')} (sha256 {str(b.get('sha256'))[:12]}){also}: other data would skip or repeat "
            f"samples. Resume with the data the run started with, or start a new run without ckpt_path"
        )
    advice = f"pass {key}={_show(theirs.get(key))}" if key.startswith(("data.", "task.", "peft.", "trainer.")) else ""
    raise CheckpointError(
        f"ckpt_path: {key} is {_show(theirs.get(key))} in the checkpoint's run, {_show(ours.get(key))} here{also}. "
        f"A resume trains on as the run started (README, Sweeps, resume: what may change): "
        f"{advice + ', or ' if advice else ''}start a new run without ckpt_path"
    )


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict) and "sha256" in a and "sha256" in b:
        return a["sha256"] != b["sha256"]  # a data file moved or renamed is the same data
    return _plain(a) != _plain(b)


def _plain(value: Any) -> Any:
    return list(map(_plain, value)) if isinstance(value, (list, tuple)) else value


def _show(value: Any) -> str:
    """A value as one would type it in an override: true, null, [q_proj,v_proj]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(_show, value)) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_show(v)}" for k, v in value.items()) + "}"
    return str(value)
