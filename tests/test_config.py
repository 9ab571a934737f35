"""Every config option composes and validates without building anything; the paper's runs pin their values."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from gpt4llm.app.checks import check_config
from gpt4llm.errors import ConfigError
from gpt4llm.training.hardware import derive_accumulation
from helpers.configs import CONF, compose_train


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def resolved(cfg):
    """Resolve everything but Hydra's runtime output dir, which only exists inside a Hydra run."""
    cfg.paths.output_dir = "/tmp/run"
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize(
    "group", ["task", "model", "data", "trainer", "strategy", "logger", "callbacks", "experiment", "hparams_search"]
)
def test_every_option_of_every_group_composes_and_validates(group):
    assert options(group), f"conf/{group} is empty"
    for option in options(group):
        overrides = [f"{group}={option}"] + (["model.path=/models/x"] if option == "hf" else [])
        overrides += ["data.path=/data/x.json"] if option == "local" else []
        cfg = compose_train(overrides)
        check_config(cfg)
        resolved(cfg)


@pytest.mark.parametrize("model", ["llama7b", "llama13b"])
@pytest.mark.parametrize("strategy", ["deepspeed_zero2", "deepspeed_zero3_offload", "fsdp", "ddp"])
def test_llama_with_each_strategy_on_v100x16(model, strategy):
    cfg = compose_train([f"model={model}", "data=alpaca_gpt4", "trainer=v100x16", f"strategy={strategy}"])
    check_config(cfg)
    assert cfg.trainer.devices * cfg.trainer.num_nodes == 16 and cfg.trainer.precision == "16-mixed"


def test_paper_sft_run_pins_the_papers_hyperparameters():
    cfg = compose_train(["experiment=paper_sft_llama7b_gpt4"])
    check_config(cfg)
    c = resolved(cfg)
    assert c["model"]["path"] == "huggyllama/llama-7b" and c["data"]["path"].endswith("alpaca_gpt4_data.json")
    assert c["trainer"]["max_epochs"] == 3
    assert c["task"]["optimizer"]["lr"] == 2e-5 and c["task"]["optimizer"]["weight_decay"] == 0.0
    assert c["task"]["lr_scheduler"] == "cosine" and c["task"]["warmup_ratio"] == 0.03
    assert c["data"]["max_length"] == 512 and c["global_batch_size"] == 64
    assert derive_accumulation(64, c["data"]["batch_size"], 16) == 4  # the paper's 16 x 1 x 4


@pytest.mark.parametrize(
    "experiment, data_file",
    [
        ("paper_sft_llama7b_gpt4_zh", "alpaca_gpt4_data_zh.json"),
        ("paper_sft_llama7b_alpaca", "alpaca_data.json"),
        ("paper_sft_llama7b_unnatural", "unnatural_instruction_gpt4_data.json"),
    ],
)
def test_other_paper_runs_share_the_recipe(experiment, data_file):
    c = resolved(compose_train([f"experiment={experiment}"]))
    assert c["data"]["path"].endswith(data_file)
    assert c["task"]["optimizer"]["lr"] == 2e-5 and c["global_batch_size"] == 64 and c["trainer"]["max_epochs"] == 3


def test_a_misspelled_key_is_named():
    cfg = compose_train(["+data.batch_sise=4"])
    with pytest.raises(
        ConfigError,
        match=r"data\.batch_sise: .*SFTDataModule has no parameter 'batch_sise'\. Did you mean 'batch_size'\?",
    ):
        check_config(cfg)
    cfg = compose_train(["+trainer.max_epoch=4"])
    with pytest.raises(ConfigError, match=r"trainer\.max_epoch: .*Did you mean 'max_epochs'"):
        check_config(cfg)
    # keys a subclass passes on to its base with **kwargs are checked against the base's parameters
    for overrides, key in (
        (["+task.warmup_ration=0.1"], r"task\.warmup_ration: .*Did you mean 'warmup_ratio'"),
        (["task=rm", "data=demo_pairs", "+data.val_sise=3"], r"data\.val_sise: .*Did you mean 'val_size'"),
    ):
        with pytest.raises(ConfigError, match=key):
            check_config(compose_train(overrides))


def test_a_bad_target_is_named():
    cfg = compose_train(["task._target_=gpt4llm.models.nothing.Here"])
    with pytest.raises(ConfigError, match=r"task\._target_: cannot import 'gpt4llm\.models\.nothing\.Here'"):
        check_config(cfg)


def test_global_batch_must_divide():
    assert derive_accumulation(64, 4, 2) == 8
    with pytest.raises(ValueError, match="not a multiple"):
        derive_accumulation(64, 3, 2)


@pytest.mark.parametrize(
    "overrides, metric",
    [
        ([], "val/loss"),  # the demo
        (["task=rm", "data=demo_pairs"], "val/loss"),
        (["experiment=paper_rm_opt1.3b"], "val/loss"),
        (["experiment=dpo_llama7b_gpt4"], "val/rewards/accuracies"),
        (["experiment=dpo_lora_llama7b_gpt4"], "val/rewards/accuracies"),
        (["experiment=grpo_llama7b_gpt4_rm"], "val/reward"),
    ],
)
def test_the_optimized_metric_is_the_one_the_readme_names(overrides, metric):
    """README's Sweeps section once named val/exact_match and val/rm_acc as defaults that no config set."""
    readme = (CONF.parent / "README.md").read_text()
    assert compose_train(overrides).optimized_metric == metric
    assert f"`{metric}`" in readme.split("## Sweeps, resume")[1].split("\n## ")[0]
    assert "`val/exact_match` for the demo, `val/rm_acc` for the reward model" not in readme


@pytest.mark.parametrize(
    "overrides, lr",
    [
        (["model=hf", "model.path=/models/x"], 2e-5),  # full fine-tuning: the model's rate
        (["model=hf", "model.path=/models/x", "peft=lora"], 2e-4),  # adapters: their own, ten times higher
        (["model=hf", "model.path=/models/x", "peft=qlora"], 2e-4),
        (["model=hf", "model.path=/models/x", "peft=lora", "peft.lr=1e-4"], 1e-4),
        (["model=hf", "model.path=/models/x", "peft=lora", "task=rm", "data=demo_pairs"], 2e-4),
        (["experiment=lora_sft_llama7b_gpt4"], 3e-4),  # a recipe's own rate wins
    ],
)
def test_lora_runs_get_the_adapters_learning_rate(overrides, lr):
    """peft=lora once kept full fine-tuning's 2e-5, where alpaca-lora and LLaMA-Factory train adapters at 1e-4..3e-4."""
    assert compose_train(overrides).task.optimizer.lr == pytest.approx(lr)


def test_gradient_checkpointing_is_on_for_real_models_as_trl_and_llama_factory_have_it():
    assert compose_train(
        ["model=hf", "model.path=/models/x", "task=dpo", "data=demo_pairs"]
    ).task.gradient_checkpointing
    assert not compose_train([]).task.gradient_checkpointing  # the tiny demo model: it never pays there
