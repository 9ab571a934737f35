"""Throughput metrics: real-token counts of padded and packed batches, the FLOPs formula, and `train/mfu`."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from gpt4llm.data.collators import PackedCollator, SFTCollator
from gpt4llm.training import callbacks
from gpt4llm.training.callbacks import TokenThroughput, example_lengths
from gpt4llm.training.flops import matmul_parameters, training_flops

EXAMPLES = [
    {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
    {"input_ids": [8, 9, 10, 11, 12], "labels": [-100, -100, 10, 11, 12]},
    {"input_ids": [13], "labels": [-100]},
]


@pytest.mark.parametrize("collate", [SFTCollator(pad_token_id=0), PackedCollator()], ids=["padded", "packed"])
def test_example_lengths_count_real_tokens_of_each_example(collate):
    assert example_lengths(collate(EXAMPLES)).tolist() == [3, 5, 1]


def test_training_flops_is_six_per_matmul_parameter_and_attention_per_context():
    # Two examples of 3 and 5 tokens, 100 matmul parameters, 2 layers of width 4.
    expected = 6 * 100 * (3 + 5) + 12 * 2 * 4 * (3 * 3 + 5 * 5)
    assert training_flops(100, 2, 4, [3, 5]) == expected


def test_matmul_parameters_leave_out_the_input_embedding_unless_tied():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    untied = LlamaForCausalLM(LlamaConfig(**config, tie_word_embeddings=False))
    tied = LlamaForCausalLM(LlamaConfig(**config, tie_word_embeddings=True))
    total = sum(p.numel() for p in untied.parameters())
    assert matmul_parameters(untied) == total - 64 * 16
    assert matmul_parameters(tied) == sum(p.numel() for p in tied.parameters())  # the shared matrix still multiplies


class _Module:
    """What the callback reads of a LightningModule: the HF model, its device, and `log`."""

    def __init__(self, model):
        self.model, self.device, self.logged = model, torch.device("cpu"), {}

    def log(self, name, value, **kwargs):
        self.logged[name] = float(value)


@pytest.fixture
def tiny_causal_lm(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def run_one_batch(callback, model, batch, monkeypatch, seconds=2.0):
    clock = iter([10.0, 10.0 + seconds])
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    module, trainer = _Module(model), SimpleNamespace(world_size=2, precision="32-true")
    callback.on_train_start(trainer, module)
    callback.on_train_batch_end(trainer, module, None, batch, 0)
    return module.logged


def test_throughput_logs_real_tokens_padding_and_mfu_against_the_given_peak(tiny_causal_lm, monkeypatch):
    batch = SFTCollator(pad_token_id=0)(EXAMPLES)  # 9 real tokens of 15 computed
    logged = run_one_batch(TokenThroughput(peak_tflops=1e-6), tiny_causal_lm, batch, monkeypatch)
    assert logged["train/tokens_per_s"] == pytest.approx(9 * 2 / 2.0)  # both ranks' tokens
    assert logged["train/pad_fraction"] == pytest.approx(6 / 15)
    config = tiny_causal_lm.config
    flops = training_flops(matmul_parameters(tiny_causal_lm), config.num_hidden_layers, config.hidden_size, [3, 5, 1])
    assert logged["train/mfu"] == pytest.approx(flops / 2.0 / 1e6)  # this rank's useful FLOPs/s over its peak


def test_no_mfu_where_no_peak_is_known(tiny_causal_lm, monkeypatch):
    logged = run_one_batch(TokenThroughput(), tiny_causal_lm, PackedCollator()(EXAMPLES), monkeypatch)
    assert "train/mfu" not in logged and logged["train/pad_fraction"] == 0.0
