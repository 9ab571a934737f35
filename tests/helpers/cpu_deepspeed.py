"""Lightning's DeepSpeedStrategy on DeepSpeed's CPU accelerator, for tests only (`DS_ACCELERATOR=cpu`).

Lightning refuses DeepSpeed on anything but CUDA in three places, none of which DeepSpeed itself needs: the accelerator
type, the device indices, and the device rank it hands `deepspeed.initialize` (a CPU device has no index). This lifts
those three and nothing else, so a test runs our strategy configs through Lightning's own DeepSpeed code path
(zero.Init around configure_model, deepspeed.initialize, its checkpoints) with real optimizer steps on the CPU.
"""

from __future__ import annotations

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy

from gpt4llm.training.strategies import DeepSpeedStrategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # DeepSpeedStrategy's own adds only the CUDA check

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()  # gloo on DeepSpeed's CPU accelerator

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)


def train_under(tmp, strategy: str | None, args: list[str], run_id: str):
    """`gpt4llm.train <args>` in `tmp` under a strategy config (None: none), the DeepSpeed ones on DeepSpeed's CPU
    accelerator through CPUDeepSpeedStrategy; a key given twice takes its later value. Returns the run directory."""
    from helpers.configs import ROOT
    from helpers.runs import run_cli

    if strategy and strategy.startswith("deepspeed"):
        args = [*args, f"strategy={strategy}", "strategy._target_=helpers.cpu_deepspeed.CPUDeepSpeedStrategy"]
    elif strategy:
        args = [*args, f"strategy={strategy}"]
    args = list({a.split("=", 1)[0]: a for a in args}.values())
    tmp.mkdir(parents=True, exist_ok=True)
    run_cli("gpt4llm.train", args, cwd=tmp, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT / "tests"), GPT4LLM_RUN_ID=run_id)
    return tmp / "run"
