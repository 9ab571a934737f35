"""The strategy configs: the paper's ds_config.json values, batch sizes that cannot disagree, cosine stays cosine."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from hydra.utils import instantiate

from gpt4llm.app.checks import check_config
from gpt4llm.errors import ConfigError
from helpers.configs import SHARED_DATA, compose_train

PAPER = ["experiment=paper_sft_llama7b_gpt4", "trainer=v100x16"]
# ds_config.json's "auto" values as Hugging Face's Trainer fills them for LLaMA-7B (hidden 4096)
AUTO_FOR_LLAMA7B = {
    "reduce_bucket_size": 4096 * 4096,
    "stage3_prefetch_bucket_size": int(0.9 * 4096 * 4096),
    "stage3_param_persistence_threshold": 10 * 4096,
}


def deepspeed_config(overrides, precision="16-mixed", accumulation=4, clip=1.0) -> dict:
    """The DeepSpeed config Lightning hands to deepspeed.initialize, built on CPU without a GPU or a process group."""
    from lightning.pytorch.plugins.precision import DeepSpeedPrecision

    strategy = instantiate(compose_train(overrides).strategy)
    strategy._lightning_module = SimpleNamespace(
        trainer=SimpleNamespace(accumulate_grad_batches=accumulation, gradient_clip_val=clip)
    )
    strategy._precision_plugin = DeepSpeedPrecision(precision)
    strategy._format_config()
    return strategy.config


def papers_ds_config() -> dict:
    path = SHARED_DATA / "gpt4llm_plots" / "ds_config.json"
    if not path.exists():
        pytest.skip(f"{path} not available")
    return json.loads(path.read_text())


def test_zero3_offload_is_the_papers_ds_config():
    ours, paper = deepspeed_config(PAPER + ["strategy=deepspeed_zero3_offload"]), papers_ds_config()
    assert ours["fp16"] == {k: v for k, v in paper["fp16"].items() if k != "enabled"} | {"enabled": True}
    zero = ours["zero_optimization"]
    for key, value in paper["zero_optimization"].items():
        if value == "auto":
            assert zero[key] == AUTO_FOR_LLAMA7B[key], key
        elif isinstance(value, dict):
            assert {k: zero[key][k] for k in value} == value, key  # offload_optimizer / offload_param: cpu, pinned
        else:
            assert zero[key] == value, key
    # what the paper left "auto" comes from the trainer and the data; nothing hard-coded
    assert ours["gradient_accumulation_steps"] == 4 and ours["gradient_clipping"] == 1.0
    assert ours["train_micro_batch_size_per_gpu"] == 1 and "train_batch_size" not in ours
    # no DeepSpeed optimizer or scheduler block: Lightning steps task.optimizer and task.lr_scheduler (cosine),
    # where the paper's "scheduler": WarmupLR silently replaced the cosine schedule
    assert "optimizer" not in ours and "scheduler" not in ours
    assert compose_train(PAPER).task.lr_scheduler == "cosine"


def test_deepspeed_accepts_the_config_and_derives_the_global_batch():
    from deepspeed.runtime.config import DeepSpeedConfig

    for strategy in ("deepspeed_zero3_offload", "deepspeed_zero3", "deepspeed_zero2"):
        config = deepspeed_config(PAPER + [f"strategy={strategy}"])
        parsed = DeepSpeedConfig(dict(config))  # DeepSpeed's own validation; one process here
        assert parsed.train_batch_size == 1 * 4 * 1 and parsed.float16_config.enabled
        assert parsed.zero_optimization_stage == int(strategy.startswith("deepspeed_zero3")) + 2
        if strategy.startswith("deepspeed_zero3"):
            assert (
                parsed.zero_config.gather_16bit_weights_on_model_save
                and parsed.zero_config.max_live_parameters == 10**9
            )
        assert config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"] * 16 == 64  # 16 V100s


def test_precision_comes_from_the_trainer():
    config = deepspeed_config(PAPER + ["strategy=deepspeed_zero3_offload"], precision="bf16-mixed")
    assert config["bf16"] == {"enabled": True} and "fp16" not in config
    assert "fp16" not in deepspeed_config(PAPER + ["strategy=deepspeed_zero2"], precision="32-true")


def test_a_misspelled_zero3_key_is_named():
    cfg = compose_train(PAPER + ["strategy=deepspeed_zero3_offload", "+strategy.stage3_max_live_parameter=1"])
    with pytest.raises(ConfigError, match="Did you mean 'stage3_max_live_parameters'"):
        check_config(cfg)


def test_fsdp_exposes_original_parameters():
    strategy = instantiate(compose_train(PAPER + ["strategy=fsdp"]).strategy)
    assert strategy.kwargs["use_orig_params"] is True and strategy._state_dict_type == "sharded"


def test_fsdp2_shards_over_every_process_and_says_when_checkpoints_hold_the_whole_model():
    strategy = instantiate(compose_train(PAPER + ["strategy=fsdp2"]).strategy)
    assert type(strategy).__name__ == "FSDP2Strategy" and strategy._tensor_parallel_size == 1
    assert strategy.reshard_after_forward and not strategy.cpu_offload
    # sharded checkpoints load key for key: an adapter run's keep the base too; one gathered file may hold part
    assert not strategy.loads_partial_state
    whole = instantiate(
        compose_train(PAPER + ["strategy=fsdp2", "strategy.save_distributed_checkpoint=false"]).strategy
    )
    assert whole.loads_partial_state


def test_fsdp2_in_fp16_stops_at_start_naming_what_to_use():
    from gpt4llm.errors import ConfigError
    from gpt4llm.training.strategies import check_strategy

    cfg = compose_train(PAPER + ["trainer=v100x16", "strategy=fsdp2"])
    with pytest.raises(ConfigError, match="trainer.precision=16-mixed: Lightning's ModelParallelStrategy has no fp16"):
        check_strategy(cfg.strategy, cfg.trainer.precision)
    check_strategy(cfg.strategy, "bf16-mixed")
    qlora = compose_train(PAPER + ["trainer=gpu", "strategy=fsdp2", "peft=qlora"])
    with pytest.raises(ConfigError, match="strategy=fsdp2 with peft=qlora: fully_shard cannot shard a 4-bit base"):
        check_strategy(qlora.strategy, "bf16-mixed", qlora.peft)
    lora = compose_train(PAPER + ["trainer=gpu", "strategy=fsdp2", "peft=lora"])
    check_strategy(lora.strategy, "bf16-mixed", lora.peft)
    check_strategy(compose_train(PAPER + ["trainer=v100x16", "strategy=deepspeed_zero3"]).strategy, "16-mixed")


def test_zero3_loading_is_announced_to_transformers_while_the_config_lives():
    from transformers.integrations import is_deepspeed_zero3_enabled

    from gpt4llm.models.zero3 import hf_deepspeed_config, transformers_zero3_off

    strategy = instantiate(compose_train(PAPER + ["strategy=deepspeed_zero3_offload"]).strategy)
    zero2 = instantiate(compose_train(PAPER + ["strategy=deepspeed_zero2"]).strategy)
    assert hf_deepspeed_config(None) is None and hf_deepspeed_config(zero2) is None
    kept = hf_deepspeed_config(strategy)
    try:
        assert is_deepspeed_zero3_enabled()  # from_pretrained now loads into zero.Init's partitions
        with transformers_zero3_off():  # the export's reload on rank 0 alone
            assert not is_deepspeed_zero3_enabled()
        assert is_deepspeed_zero3_enabled()
    finally:
        del kept
    assert not is_deepspeed_zero3_enabled()
