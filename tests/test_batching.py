"""Batch layouts: packed rows where each example sees only itself (and the loss is the unpacked loss), and
length-grouped padded batches that are deterministic and resume mid-epoch."""

from __future__ import annotations

import pytest
import torch

from gpt4llm.data.collators import PackedCollator, SFTCollator
from gpt4llm.data.encoding import IGNORE_INDEX
from gpt4llm.data.formats.alpaca import AlpacaFormat
from gpt4llm.data.samplers import LengthGroupedSampler
from gpt4llm.data.sft_datamodule import padding_report, resolve_batching
from gpt4llm.models.sft_module import SFTModule, token_loss
from helpers.configs import compose_train

tokenize_batch = AlpacaFormat().tokenize_examples  # stanford_alpaca's preprocess()


def masked_lm_loss(logits, labels):
    """The next-token loss from logits at every position, as transformers computes it with `labels=`."""
    return token_loss(logits[:, :-1], labels[:, 1:])


RECORDS = [
    {"instruction": "Sort the numbers.", "input": "3, 1, 2", "output": "1, 2, 3"},
    {"instruction": "Say hello.", "input": "", "output": "Hello! " * 5},
    {"instruction": "把这些词语的顺序倒过来。", "input": "学习、朋友", "output": "朋友、学习"},
]


# transformers' SDPA (one block-diagonal mask over the packed row) and ours (each example its own SDPA call).
@pytest.fixture(scope="module", params=["sdpa", "sdpa_varlen"])
def model_and_examples(request, tiny_model_dir, tokenizer):
    from gpt4llm.models.hf import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir), tokenizer, attn_implementation=request.param).eval()
    assert model.config._attn_implementation == request.param
    columns = {k: [r[k] for r in RECORDS] for k in ("instruction", "input", "output")}
    tokenized = tokenize_batch(columns, tokenizer, max_length=128)
    examples = [{"input_ids": i, "labels": lab} for i, lab in zip(tokenized["input_ids"], tokenized["labels"])]
    return model, examples


def test_layout(model_and_examples):
    _, examples = model_and_examples
    batch = PackedCollator()(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    assert batch["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in batch
    expected_positions = torch.cat([torch.arange(n) for n in lengths])
    assert torch.equal(batch["position_ids"][0], expected_positions)
    assert torch.equal(batch["input_ids"][0], torch.cat([torch.tensor(e["input_ids"]) for e in examples]))
    starts = [0, lengths[0], lengths[0] + lengths[1]]
    assert all(batch["labels"][0, s] == IGNORE_INDEX for s in starts)


@torch.no_grad()
def test_no_token_attends_across_a_boundary(model_and_examples):
    model, examples = model_and_examples
    packed = PackedCollator()(examples)
    logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
    start = 0
    for e in examples:
        alone = model(input_ids=torch.tensor([e["input_ids"]])).logits[0]
        torch.testing.assert_close(logits[start : start + len(e["input_ids"])], alone, rtol=1e-4, atol=1e-4)
        start += len(e["input_ids"])


@torch.no_grad()
def test_packed_loss_equals_unpacked_loss(model_and_examples, tokenizer):
    model, examples = model_and_examples
    packed = PackedCollator()(examples)
    padded = SFTCollator(tokenizer.pad_token_id)(examples)
    packed_loss, packed_n = masked_lm_loss(
        model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits,
        packed["labels"],
    )
    padded_loss, padded_n = masked_lm_loss(
        model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits, padded["labels"]
    )
    assert packed_n == padded_n
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-5)


def test_length_grouped_batches_are_full_similar_and_cover_every_example():
    lengths = [(i * 37) % 101 + 1 for i in range(1000)]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=1, group_batches=16)
    order = list(sampler)
    assert sorted(order) == list(range(1000))
    batches = [order[i : i + 8] for i in range(0, 1000, 8)]
    pad = 1 - sum(lengths) / sum(max(lengths[i] for i in b) * len(b) for b in batches)
    assert pad < 0.1  # random batches of these lengths waste about 40%
    assert list(sampler) != order  # a new epoch, a new order
    assert LengthGroupedSampler(lengths, 8, seed=1, group_batches=16).order(0) == order


def test_length_grouped_sampler_resumes_mid_epoch():
    lengths = list(range(1, 101))
    sampler = LengthGroupedSampler(lengths, batch_size=4, seed=0)
    list(sampler)  # epoch 0
    it = iter(sampler)
    first = [next(it) for _ in range(40)]
    state = sampler.state_dict()
    rest = list(it)
    resumed = LengthGroupedSampler(lengths, batch_size=4, seed=0)
    resumed.load_state_dict(state)
    assert state == {"epoch": 1, "yielded": 40} and list(resumed) == rest and first + rest == sampler.order(1)


def test_padding_report_counts_what_each_batching_wastes():
    report = padding_report([10, 10, 2, 2], batch_size=2, seed=0, batching="grouped")
    assert report["pad_fraction"]["grouped"] == 0.0 and report["pad_fraction"]["packed"] == 0.0
    assert 0.0 <= report["pad_fraction"]["random"] <= 1 - 24 / 40


@pytest.mark.parametrize(
    "attention, batching",
    [("flash_attention_2", "packed"), ("sdpa_varlen", "packed"), ("sdpa", "grouped"), (None, "grouped")],
)
def test_auto_batching_packs_only_where_attention_runs_examples_apart(attention, batching):
    from hydra.utils import instantiate

    cfg = compose_train(["model=llama7b", "data=alpaca_gpt4", f"model.attn_implementation={attention or 'null'}"])
    assert cfg.task.attn_implementation == attention
    assert instantiate(cfg.data, tokenizer=None).batching == batching
    assert resolve_batching("random", attention) == "random"  # an explicit choice is kept


@torch.no_grad()
def test_sdpa_varlen_is_transformers_sdpa_on_padded_batches(tiny_model_dir, tokenizer):
    from gpt4llm.models.hf import load_causal_lm

    columns = {k: [r[k] for r in RECORDS] for k in ("instruction", "input", "output")}
    tokenized = tokenize_batch(columns, tokenizer, max_length=128)
    padded = SFTCollator(tokenizer.pad_token_id)([{"input_ids": i, "labels": i} for i in tokenized["input_ids"]])
    # Left padding too, as generation lays prompts out: the mask transformers builds must still be applied.
    for ids, mask in (
        (padded["input_ids"], padded["attention_mask"]),
        (padded["input_ids"].flip(1), padded["attention_mask"].flip(1)),
    ):
        logits = [
            load_causal_lm(str(tiny_model_dir), tokenizer, attn_implementation=name)
            .eval()(input_ids=ids, attention_mask=mask)
            .logits
            for name in ("sdpa", "sdpa_varlen")
        ]
        real = mask.bool()
        torch.testing.assert_close(logits[1][real], logits[0][real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_module_loss_computes_logits_only_where_supervised_and_is_the_full_loss(layout, tiny_model_dir, tokenizer):
    module = SFTModule(
        tokenizer,
        str(tiny_model_dir),
        optimizer={"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8},
        attn_implementation="sdpa_varlen",
    )
    module.configure_model()
    columns = {k: [r[k] for r in RECORDS] for k in ("instruction", "input", "output")}
    tokenized = tokenize_batch(columns, tokenizer, max_length=128)
    examples = [{"input_ids": i, "labels": lab} for i, lab in zip(tokenized["input_ids"], tokenized["labels"])]
    batch = (PackedCollator() if layout == "packed" else SFTCollator(tokenizer.pad_token_id))(examples)
    seen = []
    module.model.lm_head.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].shape[:2]))
    loss, tokens = module.loss(batch)
    full_loss, full_tokens = masked_lm_loss(module(batch), batch["labels"])
    torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=1e-6)
    assert tokens == full_tokens
    rows, positions = seen[0]
    if layout == "packed":  # exactly the supervised tokens go through the output layer
        assert (rows, positions) == (1, tokens)
    else:  # positions no row is trained on (the shortest prompt's) are left out
        assert positions < batch["input_ids"].size(1) - 1
