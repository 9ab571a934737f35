"""Lightning's DeepSpeedStrategy with the ZeRO-3 settings of the paper's ds_config.json that it has no argument for.

Lightning builds the DeepSpeed config from its keyword arguments and fills in what must agree with the trainer:
`gradient_accumulation_steps` (from `trainer.accumulate_grad_batches`, which `train` derives from
`global_batch_size`), `gradient_clipping` (from `trainer.gradient_clip_val`) and the fp16/bf16 block (from
`trainer.precision`). conf/strategy/deepspeed_*.yaml sets `logging_batch_size_per_gpu: ${data.batch_size}`, so the
micro-batch is the data module's; DeepSpeed then computes `train_batch_size` = micro x accumulation x world size
itself. Nothing in our configs can state a batch size that disagrees (the paper's hard-coded `train_batch_size: 64`
broke on any other GPU count), and there is no `scheduler` block, so the LR schedule is the one `task.lr_scheduler`
names (the paper's WarmupLR silently replaced its cosine).
"""

from __future__ import annotations

import inspect
import os

from lightning.pytorch.strategies import (
    DeepSpeedStrategy as _LightningDeepSpeedStrategy,
)

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


class ZeroConfigForTransformers:
    """What transformers reads of a registered DeepSpeed config (`is_zero3()` and `config`; see
    transformers.integrations.deepspeed.is_deepspeed_zero3_enabled and deepspeed_config). transformers' own
    HfDeepSpeedConfig does the same but requires the accelerate package, which nothing else here needs."""

    def __init__(self, config: dict) -> None:
        self.config = config

    def is_zero3(self) -> bool:
        return (self.config.get("zero_optimization") or {}).get("stage") == 3


def hf_deepspeed_config(strategy) -> ZeroConfigForTransformers | None:
    """Under ZeRO-3, the DeepSpeed config registered with transformers, else None.

    Lightning builds the model inside `deepspeed.zero.Init` (its sharded-init context, around `configure_model`).
    While the returned object lives, transformers knows it: `from_pretrained` then loads the checkpoint into the
    partitioned model (rank 0 reads the weights, every rank keeps only its shard) instead of materialising the whole
    model on every rank, `resize_token_embeddings` gathers the partitions it resizes, and `generate` keeps the ranks
    in step (synced_gpus). transformers holds it by a weak reference only: keep the returned object for the run
    (SFTModule keeps it as an attribute).
    """
    if not isinstance(strategy, _LightningDeepSpeedStrategy):
        return None
    strategy._init_config_if_needed()
    if not strategy.zero_stage_3:
        return None
    from transformers.integrations.deepspeed import set_hf_deepspeed_config

    registered = ZeroConfigForTransformers(strategy.config)
    set_hf_deepspeed_config(registered)
    return registered
