"""Lightning's DeepSpeedStrategy with the ZeRO-3 settings of the paper's ds_config.json that it has no argument for.

Lightning builds the DeepSpeed config from its keyword arguments and fills in what must agree with the trainer:
`gradient_accumulation_steps` (from `trainer.accumulate_grad_batches`, which `train` derives from
`global_batch_size`), `gradient_clipping` (from `trainer.gradient_clip_val`) and the fp16/bf16 block (from
`trainer.precision`). conf/strategy/deepspeed_*.yaml sets `logging_batch_size_per_gpu: ${data.batch_size}`, so the
micro-batch is the data module's; DeepSpeed then computes `train_batch_size` = micro x accumulation x world size
itself. Nothing in our configs can state a batch size that disagrees (the paper's hard-coded `train_batch_size: 64`
broke on any other GPU count), and there is no `scheduler` block, so the LR schedule is the one `task.lr_scheduler`
names (the paper's WarmupLR silently replaced its cosine).

Also what an adapter run (peft=lora|qlora) asks of the launch: `check_adapters` before anything is built, and
`build_strategy`, the configured strategy set up for it.
"""

from __future__ import annotations

import inspect
import os

from hydra.utils import instantiate
from lightning.pytorch.strategies import (
    DeepSpeedStrategy as _LightningDeepSpeedStrategy,
)

from gpt4llm.models import adapters

# ZeRO-3 settings Lightning does not expose; each default is DeepSpeed's own.
ZERO3_EXTRA_DEFAULTS = {
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 100_000,
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_max_reuse_distance": 1_000_000_000,
    "stage3_gather_16bit_weights_on_model_save": False,
}


class DeepSpeedStrategy(_LightningDeepSpeedStrategy):
    """Takes every argument of Lightning's DeepSpeedStrategy, plus the `stage3_*` keys of ZERO3_EXTRA_DEFAULTS,
    which go into the `zero_optimization` block as they would in a ds_config.json."""

    def __init__(self, *args, **kwargs) -> None:
        extra = {key: kwargs.pop(key, default) for key, default in ZERO3_EXTRA_DEFAULTS.items()}
        super().__init__(*args, **kwargs)
        user_config = kwargs.get("config") is not None or self.DEEPSPEED_ENV_VAR in os.environ
        if not user_config and self.config.get("zero_optimization") is not None:
            self.config["zero_optimization"].update(extra)


def _merged_signature() -> inspect.Signature:
    """The parent's parameters plus ours, so gpt4llm.app.checks.check_config still names a misspelled key."""
    parent = inspect.signature(_LightningDeepSpeedStrategy.__init__).parameters.values()
    params = [p for p in parent if p.name != "self"]
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in ZERO3_EXTRA_DEFAULTS.items()]
    return inspect.Signature(params)


DeepSpeedStrategy.__signature__ = _merged_signature()


# --- adapter runs -------------------------------------------------------------------------------------------------
def check_adapters(peft) -> None:
    """QLoRA where bitsandbytes cannot run 4-bit weights stops at start, in one line, before data or model is built."""
    if adapters.active(peft) and peft.get("quantization"):
        adapters.check_4bit()


def build_strategy(strategy_cfg, peft):
    """The configured strategy (`cfg.strategy`: a Strategy, or a name such as "auto" for Lightning to pick). An
    adapter run's DeepSpeed checkpoints keep the adapters alone: DeepSpeed's engine writes the weights itself, past
    HFBackboneModule.on_save_checkpoint, and the frozen base comes from model.path."""
    strategy = instantiate(strategy_cfg)
    if adapters.active(peft) and hasattr(strategy, "exclude_frozen_parameters"):
        strategy.exclude_frozen_parameters = True
    return strategy
