"""The chunked SFT loss (output layer and cross-entropy on chunks of the supervised positions, recomputed in
backward) against the plain one over the model's whole logits: the same loss and the same gradients, padded and
packed, with chunks smaller than the batch's supervised positions."""

from __future__ import annotations

import pytest
import torch

from gpt4llm.data.encoding import IGNORE_INDEX
from gpt4llm.models import response_logps
from gpt4llm.models.sft_module import SFTModule

OPTIMIZER = {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}


def plain_loss(model, batch):
    """transformers' own loss on the whole logits: the oracle (HF shifts the labels and ignores -100)."""
    inputs = {k: batch.get(k) for k in ("input_ids", "attention_mask", "position_ids")}
    return model(**inputs, labels=batch["labels"], use_cache=False).loss


def gradients(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_chunked_loss_and_gradients_equal_the_whole_logits(tokenizer, tiny_model_dir, layout, monkeypatch):
    torch.manual_seed(0)
    module = SFTModule(tokenizer, str(tiny_model_dir), dict(OPTIMIZER))
    module.configure_model()
    model = module.model.float()
    vocab = model.config.vocab_size
    if layout == "padded":
        input_ids = torch.randint(3, vocab, (3, 24))
        attention = torch.ones_like(input_ids)
        attention[1, 18:] = 0
        labels = input_ids.clone()
        labels[:, :7] = IGNORE_INDEX  # the prompts
        labels[attention == 0] = IGNORE_INDEX
        batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    else:  # one row of three sequences, position ids restarting at each (data.collators.PackedCollator)
        lengths = [9, 11, 6]
        input_ids = torch.randint(3, vocab, (1, sum(lengths)))
        position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
        labels = input_ids.clone()
        start = 0
        for n in lengths:
            labels[0, start : start + 3] = IGNORE_INDEX
            start += n
        batch = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
    monkeypatch.setattr(response_logps, "TOKEN_CHUNK", 5)  # several chunks, the last one short

    expected = plain_loss(model, batch)
    expected.backward()
    expected_grads = gradients(model)
    model.zero_grad(set_to_none=True)

    loss, tokens = module.loss(batch)
    loss.backward()
    assert tokens.item() == (labels[:, 1:] != IGNORE_INDEX).sum().item()
    assert torch.allclose(loss, expected, atol=1e-6, rtol=0)
    grads = gradients(model)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, expected_grads[name], atol=1e-6, rtol=1e-5), name

    model.zero_grad(set_to_none=True)
    module.chunked_loss = False  # the other path: transformers' logits_to_keep on the supervised positions
    unchunked, _ = module.loss(batch)
    assert torch.allclose(unchunked, expected, atol=1e-6, rtol=0)
