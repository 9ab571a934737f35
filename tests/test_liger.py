"""model.kernels=liger (gpt4llm.models.liger): the choice checked at start, and the SFT loss through Liger's fused
linear cross-entropy against the whole logits' loss and gradients. Liger's kernels are Triton's, compiled for CUDA
GPUs; on a CPU Triton's interpreter runs the fused loss (TRITON_INTERPRET=1), which is how the oracle test runs where
liger-kernel is installed (it is not a test dependency: Triton is a 1 GB wheel; bench/gpu_strategies.sh runs Liger on
a GPU)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from gpt4llm.errors import ConfigError, LaunchError
from gpt4llm.models import liger
from helpers.configs import ROOT

INSTALLED = importlib.util.find_spec("liger_kernel") is not None


def test_an_unknown_choice_is_named():
    with pytest.raises(ConfigError, match=r"model.kernels='ligr': choose liger"):
        liger.check_choice("ligr")
    liger.check_choice(None)


@pytest.mark.skipif(INSTALLED, reason="liger-kernel is installed here")
def test_liger_without_the_package_names_the_extra():
    with pytest.raises(ConfigError, match=r"pip install 'gpt4llm\[liger\]'"):
        liger.check_choice("liger")


def test_liger_on_a_cpu_stops_in_one_line_unless_triton_interprets(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(LaunchError, match="run on CUDA GPUs, and this run is on cpu"):
        liger.check_device(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    liger.check_device(torch.device("cpu"))


def test_a_model_that_transforms_its_logits_is_refused():
    from types import SimpleNamespace

    gemma2 = SimpleNamespace(config=SimpleNamespace(final_logit_softcapping=30.0))
    with pytest.raises(ConfigError, match=r"transforms its logits \(final_logit_softcapping\)"):
        liger.apply_kernels(gemma2)


@pytest.mark.skipif(not INSTALLED, reason="liger-kernel is not installed (pip install 'gpt4llm[liger]')")
@pytest.mark.parametrize("batching", ["packed", "grouped"])
def test_the_fused_loss_equals_the_whole_logits_loss_and_gradients(batching, tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT / "tests"))
    proc = subprocess.run(
        [sys.executable, "-m", "helpers.liger_loss", str(tmp_path), batching],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for way in ("liger", "chunked"):
        assert out[way] == pytest.approx(out["whole"], abs=1e-6), out
        assert out[f"{way}_grad_max_diff"] < 1e-6, out
