"""Resuming a run: where its checkpoint stands, read without loading the weights."""

from __future__ import annotations

from pathlib import Path

import torch

from gpt4llm.errors import MissingFileError


def checkpoint_step(path: str | Path) -> int:
    """The global step a Lightning checkpoint was saved at: a file, or the directory DeepSpeed writes (whose model
    states file holds Lightning's state next to DeepSpeed's). Memory-mapped: a 7B checkpoint is not read in."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(
            f"ckpt_path={path}: no such checkpoint (a run's checkpoints are <run>/checkpoints/*.ckpt)"
        )
    if path.is_dir():
        states = sorted(path.glob("*/*model_states.pt"))
        if not states:
            raise MissingFileError(
                f"ckpt_path={path}: a directory, but not a DeepSpeed checkpoint (no */*model_states.pt)"
            )
        path = states[0]
    state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return int(state["global_step"])
