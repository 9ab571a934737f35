"""Fixtures: a tiny model and tokenizer built locally (nothing is downloaded), and fake servers on loopback. What is
not a fixture (configs, CLI runs, TensorBoard scalars, the fake servers themselves) is in tests/helpers/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from gpt4llm.app import resolvers
from helpers.configs import TINY_SPEC

resolvers.register()  # what every command does on start (gpt4llm.app.cli), for the configs composed here

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
    from gpt4llm.data.tokenizer import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture
def loopback():
    """Starts fake servers (helpers.fake_servers): `loopback(ChatServer, reply=...)`; each is closed at the end."""
    started = []

    def start(fake, **kwargs):
        started.append(fake(**kwargs))
        return started[-1]

    yield start
    for fake in started:
        fake.close()
