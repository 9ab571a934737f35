"""SFT examples must be exactly what stanford_alpaca's preprocess() builds (same input_ids, same labels)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import SHARED_DATA
from gpt4llm.data.sft import IGNORE_INDEX, SFTCollator, tokenize_batch
from gpt4llm.prompts import format_prompt

RECORDS = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "1. Eat well.\n2. Sleep.\n3. Move."},
    {"instruction": "Add the two numbers.", "input": "12 and 35", "output": "47"},
    {"instruction": "把这个词倒过来写。", "input": "学习", "output": "习学"},
    {"instruction": "Summarise the text.", "input": "word " * 6, "output": "A long text. " * 40},  # past the limit
]
MAX_LENGTH = 128


def stanford_preprocess(records, tokenizer, max_length):
    """The oracle: stanford_alpaca's preprocess() as the paper ran it, one record per tokenizer call with
    padding='longest', truncation at model_max_length, and the prompt length counted as non-pad tokens."""
    sources = [format_prompt(r["instruction"], r["input"]) for r in records]
    targets = [f"{r['output']}{tokenizer.eos_token}" for r in records]

    def tokenize(strings):
        out = [tokenizer(s, return_tensors="pt", padding="longest", max_length=max_length, truncation=True) for s in strings]
        ids = [t.input_ids[0] for t in out]
        return ids, [t.input_ids.ne(tokenizer.pad_token_id).sum().item() for t in out]

    input_ids, _ = tokenize([s + t for s, t in zip(sources, targets)])
    _, source_lens = tokenize(sources)
    labels = copy.deepcopy(input_ids)
    for label, n in zip(labels, source_lens):
        label[:n] = IGNORE_INDEX
    return input_ids, labels


def ours(records, tokenizer, max_length):
    columns = {k: [r[k] for r in records] for k in ("instruction", "input", "output")}
    return tokenize_batch(columns, tokenizer, max_length)


def assert_same_as_stanford(records, tokenizer, max_length):
    expected_ids, expected_labels = stanford_preprocess(records, tokenizer, max_length)
    got = ours(records, tokenizer, max_length)
    for i in range(len(records)):
        assert got["input_ids"][i] == expected_ids[i].tolist(), f"input_ids differ for record {i}"
        assert got["labels"][i] == expected_labels[i].tolist(), f"labels differ for record {i}"


def test_matches_stanford_alpaca_on_tiny_tokenizer(tokenizer):
    assert_same_as_stanford(RECORDS, tokenizer, MAX_LENGTH)


def test_matches_stanford_alpaca_on_llama_tokenizer():
    model_file = SHARED_DATA / "llama_tokenizer" / "tokenizer.model"
    if not model_file.exists():
        pytest.skip(f"{model_file} is absent (../shared is for development only)")
    from transformers import LlamaTokenizer

    # As a LLaMA checkpoint's tokenizer_config.json sets it up: BOS in front, no pad token of its own.
    tokenizer = LlamaTokenizer.from_pretrained(str(model_file.parent), add_bos_token=True, padding_side="right")
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    assert_same_as_stanford(RECORDS, tokenizer, MAX_LENGTH)
    got = ours(RECORDS[:1], tokenizer, MAX_LENGTH)
    assert got["input_ids"][0][0] == tokenizer.bos_token_id and got["labels"][0][-1] == tokenizer.eos_token_id


def test_labels_mask_exactly_the_prompt_and_end_with_eos(tokenizer):
    got = ours(RECORDS[1:2], tokenizer, MAX_LENGTH)
    prompt_ids = tokenizer(format_prompt("Add the two numbers.", "12 and 35"))["input_ids"]
    ids, labels = got["input_ids"][0], got["labels"][0]
    assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert labels[len(prompt_ids) :] == ids[len(prompt_ids) :]
    assert tokenizer.decode(ids[len(prompt_ids) : -1]) == "47"
    assert labels[-1] == tokenizer.eos_token_id
    assert got["ends_with_eos"] == [True]


def test_records_past_the_limit_are_cut_and_lose_their_eos(tokenizer):
    got = ours(RECORDS[3:], tokenizer, MAX_LENGTH)
    assert len(got["input_ids"][0]) == MAX_LENGTH
    assert got["untruncated_tokens"][0] > MAX_LENGTH
    assert got["ends_with_eos"] == [False]
    assert got["supervised_tokens"][0] > 0


def test_collator_pads_right_and_keeps_eos_when_pad_is_eos(tokenizer):
    got = ours(RECORDS[:2], tokenizer, MAX_LENGTH)
    examples = [{"input_ids": i, "labels": l} for i, l in zip(got["input_ids"], got["labels"])]
    eos = tokenizer.eos_token_id
    batch = SFTCollator(pad_token_id=eos)(examples)  # the pad token is the EOS token here
    short, long_ = sorted(range(2), key=lambda i: len(examples[i]["input_ids"]))
    n = len(examples[short]["input_ids"])
    assert batch["input_ids"].shape == (2, len(examples[long_]["input_ids"]))
    assert batch["input_ids"][short, n:].eq(eos).all()
    assert batch["labels"][short, n:].eq(IGNORE_INDEX).all()
    # the real EOS at the end of the short example is attended to and supervised
    assert batch["attention_mask"][short].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert batch["labels"][short, n - 1].item() == eos
    assert torch.equal(batch["input_ids"][long_], torch.tensor(examples[long_]["input_ids"]))
