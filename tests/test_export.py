"""The export holds complete, verified weights or does not exist."""

from __future__ import annotations

import pytest
import torch

from gpt4llm.errors import ExportError
from gpt4llm.models.export import (
    _write_verified,
    check_complete,
    expected_shapes,
    export_hf,
    in_training_logits,
    verification_batch,
)
from gpt4llm.models.hf import load_causal_lm


@pytest.fixture()
def model(tiny_model_dir, tokenizer):
    torch.manual_seed(0)
    return load_causal_lm(str(tiny_model_dir), tokenizer).train()  # as SFTModule.configure_model leaves it


def test_export_reloads_to_the_same_logits(model, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_hf(model, tokenizer, tmp_path / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary directory left behind
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tokenizer.get_vocab()
    batch = verification_batch(tokenizer)
    torch.testing.assert_close(reloaded(**batch).logits, in_training_logits(model, batch), rtol=0, atol=1e-5)
    assert model.training  # the check put the model back as it found it


def test_empty_partial_or_missing_tensors_are_errors(model):
    expected = expected_shapes(model)
    full = {k: v.detach() for k, v in model.state_dict().items()}
    check_complete(full, expected)

    name = "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(ExportError, match=rf"{name}: shape \(0,\)"):
        check_complete(full | {name: torch.empty(0)}, expected)  # a ZeRO-3 placeholder, saved without gathering
    with pytest.raises(ExportError, match=rf"{name}: shape \(32, 64\), config says \(64, 64\)"):
        check_complete(full | {name: full[name][:32]}, expected)  # one rank's shard
    with pytest.raises(ExportError, match="1 missing .*lm_head.weight"):
        check_complete({k: v for k, v in full.items() if k != "lm_head.weight"}, expected)
    with pytest.raises(ExportError, match="1 unexpected .*model.model.norm.weight"):
        check_complete(full | {"model.model.norm.weight": full["model.norm.weight"]}, expected)  # a wrong prefix


def test_weights_that_are_not_the_trained_ones_fail_verification(model, tokenizer, tmp_path):
    batch = verification_batch(tokenizer)
    reference = in_training_logits(model, batch)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["model.layers.1.mlp.down_proj.weight"].normal_(std=0.5)  # e.g. a shard from another step or rank
    with pytest.raises(ExportError, match="logits differ from the in-training model's"):
        _write_verified(model, tokenizer, tmp_path / "export", state, reference, batch)
    assert list(tmp_path.iterdir()) == []  # neither the export nor its temporary directory


def test_tolerance_follows_the_precision_trained_in(model, tokenizer, tmp_path):
    """A model computing in bf16 verifies against its fp32 reload; the same gap in fp32 would be an error."""
    batch = verification_batch(tokenizer)
    bf16 = in_training_logits(model.to(torch.bfloat16), batch)
    model.float()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _write_verified(model, tokenizer, tmp_path / "export", state, bf16, batch)
    with pytest.raises(ExportError, match="allowed 0.0001 for torch.float32"):
        _write_verified(model, tokenizer, tmp_path / "again", state, bf16.float(), batch)
