"""SFT examples must be exactly what stanford_alpaca's preprocess() builds (same input_ids, same labels), and for a
SentencePiece model, ids exactly as the sentencepiece library gives them (stanford_alpaca's use_fast=False)."""

from __future__ import annotations

import copy

import pytest
import torch

from gpt4llm.data.collators import SFTCollator
from gpt4llm.data.encoding import IGNORE_INDEX
from gpt4llm.data.formats.alpaca import AlpacaFormat
from gpt4llm.data.prompts import format_prompt
from helpers.configs import SHARED_DATA

tokenize_batch = AlpacaFormat().tokenize_examples  # stanford_alpaca's preprocess()

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
        out = [
            tokenizer(s, return_tensors="pt", padding="longest", max_length=max_length, truncation=True)
            for s in strings
        ]
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


# Where the paper's tokenizer and ours could part: indentation, runs of spaces, tabs, CJK, emoji, trailing spaces,
# a special-token string inside the text, and a record past the length limit.
HARD_RECORDS = [
    {
        "instruction": "Fix the code.",
        "input": "def f(x):\n    for i in range(x):\n\tprint(i)  ",
        "output": "def f(x):\n    for i in range(x):\n        print(i)\n",
    },
    {"instruction": "Explain  double  spaces.", "input": "", "output": "Two  spaces,   three,\t\ttabs.  "},
    {"instruction": "把这个句子翻译成英文。", "input": "我喜欢 学习 🙂", "output": "I like   learning 🙂🚀  "},
    {"instruction": "Repeat.", "input": "</s> and <s>", "output": "The text says </s>."},
    {"instruction": "List numbers.", "input": "", "output": "    " + "  ".join(str(i) for i in range(200))},
]


def sentencepiece_oracle(records, model_file, bos_id, eos_id, max_length):
    """stanford_alpaca's ids and labels computed with the sentencepiece library alone: BOS, the text's pieces (a
    special-token string in the text becomes its id, as the slow LlamaTokenizer split it out), EOS; cut at
    max_length; labels mask the prompt's own token count."""
    import re

    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    specials = {sp.id_to_piece(i): i for i in (bos_id, eos_id)}

    def encode(text):
        parts = re.split("(" + "|".join(map(re.escape, specials)) + ")", text)
        return [bos_id] + [i for k, p in enumerate(parts) if p for i in ([specials[p]] if k % 2 else sp.encode(p))]

    ids, labels = [], []
    for r in records:
        prompt = format_prompt(r["instruction"], r["input"])
        full = encode(prompt + r["output"] + sp.id_to_piece(eos_id))[:max_length]
        n = min(len(encode(prompt)), len(full))
        ids.append(full)
        labels.append([IGNORE_INDEX] * n + full[n:])
    return ids, labels


def assert_same_as_sentencepiece(records, tokenizer, model_file, max_length):
    expected_ids, expected_labels = sentencepiece_oracle(
        records, model_file, tokenizer.bos_token_id, tokenizer.eos_token_id, max_length
    )
    got = ours(records, tokenizer, max_length)
    mismatched = [
        i
        for i in range(len(records))
        if got["input_ids"][i] != expected_ids[i] or got["labels"][i] != expected_labels[i]
    ]
    assert not mismatched, (
        f"{len(mismatched)} of {len(records)} records differ from SentencePiece, first {mismatched[:5]}"
    )


def test_sentencepiece_model_gives_sentencepiece_ids(sentencepiece_model_dir):
    from gpt4llm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(sentencepiece_model_dir))
    assert_same_as_sentencepiece(HARD_RECORDS, tokenizer, sentencepiece_model_dir / "tokenizer.model", MAX_LENGTH)
    assert ours(HARD_RECORDS[4:], tokenizer, MAX_LENGTH)["untruncated_tokens"][0] > MAX_LENGTH  # the cut is tested
    # decoding gives the text back (byte-fallback pieces included), so generation answers are what the model wrote
    for r in HARD_RECORDS:
        if "</s>" not in r["output"]:  # (after a special token, legacy SentencePiece adds its dummy-prefix space)
            assert tokenizer.decode(tokenizer(r["output"])["input_ids"], skip_special_tokens=True) == r["output"]


def llama_tokenizer_dir():
    directory = SHARED_DATA / "llama_tokenizer"
    if not (directory / "tokenizer.model").exists():
        pytest.skip(f"{directory} is absent (../shared is for development only)")
    return directory


def test_llama_tokenizer_gives_sentencepiece_ids_on_gpt4_records():
    """LLaMA's own tokenizer.model on the hard records and on 1k real GPT-4 records (51 of them differ through
    transformers 5's converted tokenizer: the code and indentation ones)."""
    import json

    from gpt4llm.data.tokenizer import load_tokenizer

    directory = llama_tokenizer_dir()
    tokenizer = load_tokenizer(str(directory))
    records = HARD_RECORDS + [
        {"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]}
        for r in json.loads((SHARED_DATA / "alpaca_gpt4_sample_1k.json").read_text())
    ]
    assert_same_as_sentencepiece(records, tokenizer, directory / "tokenizer.model", 512)
    assert tokenizer("\n    for")["input_ids"] == [1, 29871, 13, 1678, 363]  # the example, SentencePiece's ids


def test_matches_stanford_alpaca_on_llama_tokenizer():
    from gpt4llm.data.tokenizer import load_tokenizer

    # stanford's preprocess() structure (per-record calls, padding="longest", prompt length by non-pad count)
    tokenizer = load_tokenizer(str(llama_tokenizer_dir()))
    assert_same_as_stanford(RECORDS + HARD_RECORDS, tokenizer, MAX_LENGTH)
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
    examples = [{"input_ids": i, "labels": lab} for i, lab in zip(got["input_ids"], got["labels"])]
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
