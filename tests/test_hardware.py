"""Launch checks: bf16 on a V100 stops at start; torchrun/srun ranks share one run directory."""

from __future__ import annotations

import pytest

from gpt4llm.errors import LaunchError
from gpt4llm.training.hardware import check_launch, check_precision, cuda_capabilities, external_launcher
from helpers.configs import compose_train


def test_bf16_on_a_v100_stops_with_what_to_use():
    cfg = compose_train(
        ["model=llama7b", "trainer=v100x16", "strategy=deepspeed_zero3_offload", "trainer.precision=bf16-mixed"]
    )
    # the capability as train passes it on a V100 (cuda_capabilities()), injected: no GPU is needed or faked
    message = (
        r"trainer.precision=bf16-mixed, but Tesla V100-SXM2-32GB has no bf16.*use trainer.precision=16-mixed on V100"
    )
    with pytest.raises(LaunchError, match=message):
        check_precision(
            cfg.trainer.precision, cfg.trainer.accelerator, bf16_supported=False, device_name="Tesla V100-SXM2-32GB"
        )


@pytest.mark.parametrize(
    "precision, accelerator, bf16",
    [
        ("16-mixed", "gpu", False),
        ("32-true", "gpu", False),
        ("bf16-mixed", "gpu", True),
        ("bf16-mixed", "cpu", None),
        ("bf16-true", "auto", None),
    ],
)
def test_other_combinations_pass(precision, accelerator, bf16):
    check_precision(precision, accelerator, bf16)


def test_capabilities_without_a_gpu():
    assert cuda_capabilities() == (None, "no GPU")


TORCHRUN = {"TORCHELASTIC_RUN_ID": "job7", "WORLD_SIZE": "16", "RANK": "3", "LOCAL_RANK": "3"}
SRUN = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "123"}


@pytest.mark.parametrize("env, launcher", [(TORCHRUN, "torchrun"), (SRUN, "srun")])
def test_torchrun_and_srun_need_one_run_id(env, launcher):
    assert external_launcher(env) == launcher
    with pytest.raises(LaunchError, match=f"Started by {launcher} .*GPT4LLM_RUN_ID is not set"):
        check_launch(env)
    check_launch(env | {"GPT4LLM_RUN_ID": "2026-01-01_00-00-00"})


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"LOCAL_RANK": "1", "WORLD_SIZE": "2", "NODE_RANK": "0"},  # Lightning's own launcher's child
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "5"},  # one task in an allocation
        {"TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "1"},
    ],
)
def test_single_processes_need_nothing(env):
    assert external_launcher(env) is None
    check_launch(env)


def test_run_directory_follows_the_run_id(monkeypatch):
    from hydra import compose, initialize_config_dir

    from helpers.configs import CONF

    monkeypatch.setenv("GPT4LLM_RUN_ID", "shared-by-all-ranks")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True)
    assert cfg.hydra.run.dir.endswith("/runs/shared-by-all-ranks")
