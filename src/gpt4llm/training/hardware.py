"""Launch checks that stop a run at start, with a message that says what to change, instead of failing hours later.

Capabilities are passed in (train calls these with what torch reports), so the tests inject a V100 without a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from gpt4llm.errors import ConfigError, LaunchError


def check_precision(
    precision: str, accelerator: str, bf16_supported: bool | None, device_name: str = "this GPU"
) -> None:
    """bf16 asked for on a GPU without bf16 (V100, T4, ...) stops here.

    Without this check, a V100 asked for bf16 either fails deep inside the first kernel or emulates bf16 at a
    fraction of the speed, depending on the PyTorch version. `bf16_supported` is `torch.cuda.is_bf16_supported()`
    for CUDA without emulation (`cuda_capabilities`; plain `is_bf16_supported()` says True on a V100, because bf16
    can be emulated there), None where it does not apply (CPU runs use CPU bf16).
    """
    precision = str(precision)
    if str(accelerator) != "cpu" and precision.startswith("bf16") and bf16_supported is False:
        raise LaunchError(
            f"trainer.precision={precision}, but {device_name} has no bf16 (V100 and older, T4): "
            "use trainer.precision=16-mixed on V100 (fp16 with dynamic loss scaling; trainer=v100x16 sets it)."
        )


def cuda_capabilities() -> tuple[bool | None, str]:
    """(bf16 supported, device name) of the first visible CUDA device; (None, "no GPU") without one."""
    import torch

    if not torch.cuda.is_available():
        return None, "no GPU"
    return torch.cuda.is_bf16_supported(including_emulation=False), torch.cuda.get_device_name(0)


def external_launcher(env: Mapping[str, str] = os.environ) -> str | None:
    """'torchrun' or 'srun' when this process is one of several started by that launcher, else None.

    Lightning's own launcher (several devices from one command) is not one: it gives its children the parent's run
    directory on their command line.
    """
    if "TORCHELASTIC_RUN_ID" in env and int(env.get("WORLD_SIZE", "1")) > 1:
        return "torchrun"
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in env:
        return "srun"
    return None


RUN_ID_VAR = "GPT4LLM_RUN_ID"  # conf/hydra/default.yaml names the run directory after it when set


def check_launch(env: Mapping[str, str] = os.environ) -> None:
    """Under torchrun or srun every rank composes the config and names its run directory itself; from its start
    time, ranks that start in different seconds would write to different directories (and resume from different
    ones). One shared name, set once for the job, makes it a single run directory."""
    launcher = external_launcher(env)
    if launcher and not env.get(RUN_ID_VAR):
        raise LaunchError(
            f"Started by {launcher} as one of several processes, but {RUN_ID_VAR} is not set, so each rank would name "
            f"its own run directory after its start time. Set it once for the job, the same on every node, e.g. "
            f"`export {RUN_ID_VAR}=$(date +%Y-%m-%d_%H-%M-%S)` before srun/torchrun (README: Scaling out)."
        )


def derive_accumulation(global_batch_size: int, batch_size: int, world_size: int) -> int:
    """Gradient accumulation that makes batch_size x world_size x accumulation equal the global batch."""
    per_step = batch_size * world_size
    if global_batch_size % per_step:
        raise ConfigError(
            f"global_batch_size={global_batch_size} is not a multiple of data.batch_size ({batch_size}) x "
            f"{world_size} devices; change data.batch_size or global_batch_size"
        )
    return global_batch_size // per_step
