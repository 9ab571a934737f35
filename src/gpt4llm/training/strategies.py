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

import torch
from hydra.utils import instantiate
from lightning.pytorch.strategies import (
    DeepSpeedStrategy as _LightningDeepSpeedStrategy,
)
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn

from gpt4llm.errors import ConfigError
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


# --- FSDP2 -------------------------------------------------------------------------------------------------------
class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (torch's `fully_shard`) through Lightning's ModelParallelStrategy, with data parallelism over every
    process (Lightning's default mesh would make the GPUs of a node tensor-parallel, which our models do not set up).

    Lightning asks the LightningModule's `configure_model` to apply the parallelism; ours builds the Hugging Face
    model and hands it to `shard_model` (HFBackboneModule, and its frozen copies too): each decoder layer (the classes
    the model lists in `_no_split_modules`) is its own unit, then the whole model, so one layer's weights are gathered
    at a time. Mixed precision follows the trainer's: under `bf16-mixed` the gathered weights are bf16
    and the gradients are reduced in fp32 while the sharded master weights and Adam stay fp32. fp16 (16-mixed) is
    refused by Lightning here (no loss scaling: `check_strategy` says so at start). Activation checkpointing is
    model.gradient_checkpointing, as with every strategy.

    `save_distributed_checkpoint`: each rank writes its shard (a checkpoint directory, torch.distributed.checkpoint),
    or false: the whole state gathered into one file on rank 0. The export gathers a full state dict either way.
    """

    def __init__(
        self,
        reshard_after_forward: bool = True,
        cpu_offload: bool = False,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
        )
        self.reshard_after_forward, self.cpu_offload = reshard_after_forward, cpu_offload

    @property
    def loads_partial_state(self) -> bool:
        """Whether a checkpoint may hold part of the model (an adapter run's trainable tensors): yes in one file, not
        in a sharded directory, which torch.distributed.checkpoint loads key for key."""
        return not self._save_distributed_checkpoint

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":  # every process shards the model (Lightning's: one per node)
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def shard_model(self, model) -> None:
        """Applies fully_shard to `model` (a transformers model, or a peft model around one) in place."""
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        backbone = model.get_base_model() if hasattr(model, "get_base_model") else model
        unit_classes = set(getattr(backbone, "_no_split_modules", None) or [])
        settings = {
            "mesh": self.device_mesh["data_parallel"],
            "reshard_after_forward": self.reshard_after_forward,
            "mp_policy": self._mixed_precision_policy(),
            "offload_policy": CPUOffloadPolicy(pin_memory=self.root_device.type == "cuda")
            if self.cpu_offload
            else OffloadPolicy(),
        }
        units = [m for m in model.modules() if type(m).__name__ in unit_classes]
        if not units:
            rank_zero_warn(
                f"strategy=fsdp2: {type(backbone).__name__} names no decoder layer class (_no_split_modules), so it "
                "is sharded as one unit and gathered whole for every forward"
            )
        for module in reversed(units):  # innermost first: a unit inside another is sharded before its parent
            fully_shard(module, **settings)
        # the root (embeddings, final norm, output layer): torch's own choice, which keeps it gathered from forward to
        # backward rather than gathering it again at once
        fully_shard(model, **{**settings, "reshard_after_forward": None})

    def model_to_device(self) -> None:
        """fully_shard has placed every parameter already (on the mesh's device, or in CPU memory under cpu_offload,
        which Lightning's `.to(root_device)` would undo)."""
        if not self.cpu_offload:
            super().model_to_device()

    def _mixed_precision_policy(self):
        """bf16 gathered weights and fp32 gradient reduction under the trainer's bf16-mixed; otherwise none (32-true:
        fp32 all through; `*-true`: Lightning's HalfPrecision casts the whole model itself)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if str(getattr(self.precision_plugin, "precision", "")) != "bf16-mixed":
            return MixedPrecisionPolicy()
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def check_strategy(strategy_cfg, precision, peft=None) -> None:
    """What FSDP2 cannot run stops at start in one line: fp16 (Lightning's ModelParallelStrategy has no loss scaling
    for it) and a 4-bit QLoRA base (fully_shard would shard bitsandbytes' packed weights)."""
    target = str(strategy_cfg.get("_target_", "")) if hasattr(strategy_cfg, "get") else ""
    if not target.endswith("FSDP2Strategy"):
        return
    if adapters.active(peft) and peft.get("quantization"):
        raise ConfigError(
            "strategy=fsdp2 with peft=qlora: fully_shard cannot shard a 4-bit base. Use peft=lora with fsdp2, or "
            "QLoRA with strategy=ddp or deepspeed_zero2"
        )
    if str(precision) in ("16-mixed", "16"):
        raise ConfigError(
            f"strategy=fsdp2 with trainer.precision={precision}: Lightning's ModelParallelStrategy has no fp16 loss "
            "scaling. Use trainer.precision=bf16-mixed (A100, H100), or on GPUs without bf16 (V100) "
            "strategy=deepspeed_zero3 or fsdp"
        )


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
