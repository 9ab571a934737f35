"""DeepSpeed ZeRO-3 and transformers, in one place: what the LightningModules, the export and the embedding resize need
so that a model partitioned across ranks is built, resized, gathered and reloaded correctly.

- `hf_deepspeed_config`: registers Lightning's ZeRO-3 config with transformers while the model is built, so
  `from_pretrained` loads into the partitioned model instead of materialising it on every rank.
- `gathered`: the full parameters inside a block (a partitioned parameter's data is an empty placeholder).
- `transformers_zero3_off`: a plain, single-process load while a config is registered (rank 0 reloading an export).
None of it imports deepspeed unless a model is partitioned.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch


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
    from lightning.pytorch.strategies import DeepSpeedStrategy  # the class only: deepspeed is not imported

    if not isinstance(strategy, DeepSpeedStrategy):
        return None
    strategy._init_config_if_needed()
    if not strategy.zero_stage_3:
        return None
    from transformers.integrations.deepspeed import set_hf_deepspeed_config

    registered = ZeroConfigForTransformers(strategy.config)
    set_hf_deepspeed_config(registered)
    return registered


def gathered(params: list[torch.nn.Parameter]):
    """The full parameters inside the block when DeepSpeed ZeRO-3 has partitioned them (a partitioned parameter's
    data is an empty placeholder: writing to it would silently do nothing), written back from rank 0 on exit."""
    if not any(hasattr(p, "ds_id") for p in params):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


@contextmanager
def transformers_zero3_off():
    """While a DeepSpeed ZeRO-3 config is registered with transformers (HfDeepSpeedConfig), from_pretrained and model
    construction partition collectively; rank 0 reloading the export alone must not."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def zero3_state_dict(model, rank_zero: bool, only: set[str] | None = None) -> dict[str, torch.Tensor] | None:
    """Gathers one module's partitions at a time, as DeepSpeed's _zero3_consolidated_16bit_state_dict does, but from
    the model itself, so it works whether the engine is set up for training or for inference. Collective: every
    rank calls it; rank 0 gets the complete state dict (CPU tensors), the others None. With `only`, just those
    parameters (an adapter's) are gathered, and no buffers."""
    import deepspeed

    state, seen = ({} if rank_zero else None), {}
    for prefix, module in model.named_modules():
        prefix = prefix + "." if prefix else ""
        named = [(n, p) for n, p in module.named_parameters(recurse=False) if only is None or prefix + n in only]
        if only is not None and not named:
            continue
        params = [p for _, p in named]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if rank_zero:
                for name, param in named:
                    if param.ds_id in seen:  # a tied weight: the same tensor under both names
                        state[prefix + name] = state[seen[param.ds_id]]
                    else:
                        state[prefix + name] = param.detach().cpu().clone()
                        seen[param.ds_id] = prefix + name
                for name, buffer in module.named_buffers(recurse=False) if only is None else ():
                    if name not in module._non_persistent_buffers_set:
                        state[prefix + name] = buffer.detach().cpu().clone()
    return state
