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
