"""Shared fixtures: a tiny model and tokenizer built locally (nothing is downloaded) and composed configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from gpt4llm.app import resolvers

resolvers.register()  # what every command does on start (gpt4llm.app.cli), for the configs composed here

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED_DATA = ROOT.parent / "shared" / "data"

# Small enough that a training step takes milliseconds; the same builder as model=tiny.
TINY_SPEC = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, corpus_records=600)
TINY_OVERRIDES = [f"model.tiny.{k}={v}" for k, v in TINY_SPEC.items()]

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One intra-op thread: the tiny models gain nothing from two, and on a shared 2-core machine two threads per process
# oversubscribe the cores and make small ops (generation above all) many times slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from gpt4llm.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", **TINY_SPEC)


@pytest.fixture(scope="session")
def sentencepiece_model_dir(tmp_path_factory) -> Path:
    """The tiny model with a SentencePiece BPE made like LLaMA's: the stand-in for LLaMA."""
    from gpt4llm.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sp", **TINY_SPEC, tokenizer_type="sentencepiece")


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from gpt4llm.models.hf import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def compose_train(overrides: list[str] = ()):
    """The composed train config, as `python -m gpt4llm.train <overrides>` would see it (without Hydra's runtime)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def demo_overrides(tmp: Path, *extra: str) -> list[str]:
    """A fast demo run under `tmp`: tiny model, a few hundred records, a handful of steps."""
    return [
        f"paths.data_dir={tmp / 'data'}",
        f"hydra.run.dir={tmp / 'run'}",
        f"hydra.sweep.dir={tmp / 'sweep'}",
        *TINY_OVERRIDES,
        "data.demo.num_records=240",
        "data.val_size=40",
        "data.batch_size=8",
        "data.exact_match_examples=8",
        "trainer.max_epochs=1",
        "trainer.max_steps=6",
        "trainer.log_every_n_steps=1",
        *extra,
    ]


def rm_overrides(tmp: Path, *extra: str) -> list[str]:
    """The SFT demo's fast settings (tiny model, few records and steps), with the pairs demo and the RM task."""
    sft_only = ("data.exact_match_examples",)  # instruction data only
    return ["task=rm", "data=demo_pairs", *(o for o in demo_overrides(tmp) if not o.startswith(sft_only)), *extra]


def run_cli(module: str, args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` offline in `cwd`; fails the test with the end of its output unless it exits 0."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **env)
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc
