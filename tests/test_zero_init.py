"""Model code is imported before any sharded context: with torch 2.13 a first import of torch._dynamo inside
deepspeed.zero.Init fails, and transformers imports a model's code lazily, on first use."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from helpers.configs import ROOT

FRESH_INTERPRETER = textwrap.dedent(
    """
    import os, sys
    import deepspeed, torch
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    from transformers.integrations.deepspeed import set_hf_deepspeed_config

    path = sys.argv[1]
    assert "torch._dynamo" not in sys.modules and "transformers.models.llama.modeling_llama" not in sys.modules

    from gpt4llm.models.hf import import_model_code
    from gpt4llm.models.zero3 import ZeroConfigForTransformers

    import_model_code(path, MODEL_FOR_CAUSAL_LM_MAPPING)  # what HFBackboneModule.setup does, before configure_model
    assert "torch._dynamo" in sys.modules and "transformers.models.llama.modeling_llama" in sys.modules

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed("gloo")
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}
    registered = ZeroConfigForTransformers(config)
    set_hf_deepspeed_config(registered)
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = AutoModelForCausalLM.from_pretrained(path)
    assert all(hasattr(p, "ds_id") for p in model.parameters())
    print("partitioned parameters:", sum(p.ds_numel for p in model.parameters()))
    """
)


def free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.mark.slow  # a command run as a subprocess (README, the test tiers)
def test_model_builds_under_zero_init_in_a_fresh_interpreter(tiny_model_dir):
    import transformers

    expected = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_INTERPRETER, str(tiny_model_dir), free_port()],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"partitioned parameters: {expected}" in proc.stdout


def test_the_modules_import_their_model_code_in_setup(tiny_model_dir, tokenizer, monkeypatch):
    """Lightning calls `setup` before `configure_model` (and so before zero.Init)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
    )

    from gpt4llm.models import base_module as base
    from gpt4llm.models.reward_module import RewardModule
    from gpt4llm.models.sft_module import SFTModule

    calls = []
    monkeypatch.setattr(base, "import_model_code", lambda path, mapping: calls.append((path, mapping)))
    for cls in (SFTModule, RewardModule):
        cls(tokenizer, str(tiny_model_dir), optimizer={"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}).setup("fit")
    path = str(tiny_model_dir)
    assert calls == [(path, MODEL_FOR_CAUSAL_LM_MAPPING), (path, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING)]
