"""Comparison files -> exact (prompt, chosen, rejected) pairs in every layout; bad records; splits; batches."""

from __future__ import annotations

import json
import re

import pytest

import gpt4llm.data.pair_datamodule as pairs_module
from gpt4llm.data.cache import SplitSettings
from gpt4llm.data.collators import PairCollator
from gpt4llm.data.comparisons import read_comparison_pairs
from gpt4llm.data.demo import make_demo_records
from gpt4llm.data.demo_pairs import KINDS, make_demo_pairs, write_demo_pairs_file
from gpt4llm.data.pair_datamodule import build_pair_splits
from gpt4llm.data.prompts import alpaca_prompt, format_prompt
from gpt4llm.errors import RecordError

# As in comparison_data_v2.json: the template is already there, without its final '### Response:'.
V2_PROMPT = format_prompt("Give three tips for staying healthy.").removesuffix("\n\n### Response:")
V1_PROMPT = format_prompt("Add the numbers.", "2 and 3")  # v1 kept the whole template


def write(tmp_path, records, name="pairs.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def triples(pairs):
    return [(p["index"], p["prompt"], p["chosen"], p["rejected"]) for p in pairs]


def test_prompts_are_wrapped_once():
    assert alpaca_prompt("Name a color.") == format_prompt("Name a color.")
    assert alpaca_prompt(V2_PROMPT) == format_prompt("Give three tips for staying healthy.")  # tag appended
    assert alpaca_prompt(V1_PROMPT) == V1_PROMPT
    assert alpaca_prompt(V1_PROMPT + "\n") == V1_PROMPT
    for text in ("Name a color.", V1_PROMPT, V2_PROMPT):
        assert alpaca_prompt(alpaca_prompt(text)) == alpaca_prompt(text)
        assert alpaca_prompt(text).count("Below is an instruction") == 1


def test_v2_every_differently_scored_pair_higher_preferred(tmp_path):
    path = write(
        tmp_path,
        [
            {
                "user_input": V2_PROMPT,
                "responses_and_scores": [
                    {"response": "A", "score": 9.0, "source": "gpt4"},
                    {"response": "B", "score": 7.5, "source": "text-davinci-003"},
                    {"response": "C", "score": 9, "source": "icm-1.3b"},  # ties with A
                ],
            },
            {
                "user_input": V2_PROMPT,
                "responses_and_scores": [{"response": "only one", "score": 8.0, "source": "gpt4"}],
            },
            {
                "user_input": "Say hi.",
                "responses_and_scores": [
                    {"response": "low", "score": 0, "source": "icm-1.3b"},
                    {"response": "hi", "score": 10, "source": "gpt4"},
                    {
                        "response": "hi",
                        "score": 9.5,
                        "source": "text-davinci-003",
                    },  # the same text as a better-scored one
                ],
            },
        ],
    )
    pairs, report = read_comparison_pairs(path)
    full = format_prompt("Give three tips for staying healthy.")
    # Record 2's "hi" (9.5) over "low" repeats the pair "hi" (10) over "low": dropped as a duplicate.
    assert triples(pairs) == [(0, full, "A", "B"), (0, full, "C", "B"), (2, format_prompt("Say hi."), "hi", "low")]
    assert report["layouts"] == {"comparison_data_v2": 3} and report["candidate_pairs"] == 6
    assert report["prompts_already_templated"] == 1  # record 1 is skipped before it is counted
    assert report["skipped_records"] == {"fewer than two responses": {"count": 1, "first_indices": [1]}}
    assert {k: v["count"] for k, v in report["dropped_pairs"].items()} == {
        "tied scores": 1,
        "identical responses": 1,
        "duplicate pair": 1,
    }


def test_v1_and_plain_layouts(tmp_path):
    path = write(
        tmp_path,
        [
            {"user_input": V1_PROMPT, "completion_a": "5", "completion_b": "6"},
            {"prompt": "Name a color.", "chosen": "Blue.", "rejected": "Seven."},
            {"prompt": V1_PROMPT, "chosen": "5", "rejected": "five hundred"},
            {"prompt": "Name a color.", "chosen": "Red.", "rejected": "Red."},
        ],
    )
    pairs, report = read_comparison_pairs(path)
    assert triples(pairs) == [
        (0, V1_PROMPT, "5", "6"),
        (1, format_prompt("Name a color."), "Blue.", "Seven."),
        (2, V1_PROMPT, "5", "five hundred"),
    ]
    assert report["layouts"] == {"comparison_data_v1": 1, "plain": 3}
    assert report["dropped_pairs"] == {"identical responses": {"count": 1, "first_indices": [3]}}


def test_pairs_with_an_empty_answer_are_dropped_and_counted(tmp_path, tokenizer):
    records = [{"prompt": f"Repeat the number {i}.", "chosen": str(i), "rejected": str(i + 1)} for i in range(6)]
    records += [
        {"prompt": "Say yes.", "chosen": "", "rejected": "no"},
        {"prompt": "Say no.", "chosen": "no", "rejected": " \n\t"},  # whitespace alone is empty too
        {
            "user_input": "Rate these.",
            "responses_and_scores": [
                {"response": "good", "score": 9},
                {"response": "", "score": 1},  # paired with each of the others: two empty pairs
                {"response": "fine", "score": 5},
            ],
        },
    ]
    path = write(tmp_path, records)
    pairs, report = read_comparison_pairs(path)
    assert report["dropped_pairs"] == {"empty response": {"count": 4, "first_indices": [6, 7, 8]}}
    assert [(p["index"], p["chosen"], p["rejected"]) for p in pairs][-1] == (8, "good", "fine")
    assert all(p["chosen"].strip() and p["rejected"].strip() for p in pairs)

    # The reward model's and DPO's data (one data module): not trained on, and said in the report and the summary.
    data = pairs_module.PairDataModule(
        tokenizer, path=str(path), max_length=64, val_size=2, cache_dir=str(tmp_path / "cache")
    )
    data.setup("fit")
    assert data.report["dropped_pairs"]["empty response"]["count"] == 4 and data.report["pairs"] == 7
    assert "'empty response': 4" in data.summary()
    assert sorted(i for split in data.splits.values() for i in split["index"]) == [0, 1, 2, 3, 4, 5, 8]


@pytest.mark.parametrize(
    "record, message",
    [
        (
            {"user_input": "Q", "responses_and_scores": [{"response": "a"}, {"response": "b", "score": 1}]},
            r"record 1: field 'responses_and_scores\[0\]\.score' is missing",
        ),
        (
            {
                "user_input": "Q",
                "responses_and_scores": [{"response": "a", "score": "nine"}, {"response": "b", "score": 1}],
            },
            r"record 1: field 'responses_and_scores\[0\]\.score' is 'nine' \(str\), not a number",
        ),
        (
            {
                "user_input": "Q",
                "responses_and_scores": [{"response": "a", "score": None}, {"response": "b", "score": 1}],
            },
            r"record 1: field 'responses_and_scores\[0\]\.score' is None",
        ),
        (
            {"user_input": "Q", "responses_and_scores": [{"score": 2}, {"response": "b", "score": 1}]},
            r"record 1: field 'responses_and_scores\[0\]\.response' is missing",
        ),
        (
            {"user_input": "Q", "completion_a": "a", "completion_b": 3},
            r"record 1: field 'completion_b' is int, not a string",
        ),
        ({"prompt": "Q", "chosen": "a"}, r"record 1: field 'rejected' is missing"),
        ({"prompt": "Q", "response": "a"}, r"record 1: is not a comparison record"),
        ({"prompt": "Q", "rejected": "a"}, r"record 1: field 'chosen' is missing"),
        (["not", "an", "object"], r"record 1: is a JSON list"),
    ],
)
def test_bad_records_name_file_record_and_field(tmp_path, record, message):
    path = write(tmp_path, [{"prompt": "Q", "chosen": "a", "rejected": "b"}, record])
    with pytest.raises(RecordError, match=message) as err:
        read_comparison_pairs(path)
    assert str(path) in str(err.value) and "data.skip_invalid=true" in str(err.value)
    pairs, report = read_comparison_pairs(path, skip_invalid=True)  # or counted and skipped
    assert len(pairs) == 1 and [s["first_indices"] for s in report["skipped_records"].values()] == [[1]]


def test_splits_tokenize_truncate_and_cache(tmp_path, tokenizer, monkeypatch):
    records = [{"prompt": f"Repeat the number {i}.", "chosen": str(i), "rejected": str(i + 1)} for i in range(12)]
    records += [  # differ only after 64 tokens: identical once truncated, so useless to train on
        {"prompt": "Long.", "chosen": "word " * 80 + "end", "rejected": "word " * 80 + "stop"},
        {"prompt": "Longer.", "chosen": "word " * 80, "rejected": "no"},  # truncated, but still different
    ]
    path = write(tmp_path, records)
    kwargs = dict(tokenizer=tokenizer, settings=SplitSettings(max_length=64, val_size=3), cache_dir=tmp_path / "cache")
    splits, report = build_pair_splits(path, **kwargs)
    assert report["splits"] == {"train": 10, "validation": 3} and report["pairs"] == 13
    assert report["dropped_pairs"]["identical after tokenization"] == {"count": 1, "first_indices": [12]}
    assert report["truncated"] == {"count": 2, "first_indices": [12, 13]} and report["ties_dropped"] == 0
    assert set(splits["train"]["prompt"]).isdisjoint(splits["validation"]["prompt"])

    rows = {r["index"]: r for split in splits.values() for r in split}
    row = rows[0]
    eos = tokenizer.eos_token
    assert row["chosen_input_ids"] == tokenizer(format_prompt("Repeat the number 0.") + "0" + eos)["input_ids"]
    assert row["rejected_input_ids"] == tokenizer(format_prompt("Repeat the number 0.") + "1" + eos)["input_ids"]
    assert row["chosen_input_ids"][-1] == tokenizer.eos_token_id
    long = rows[13]
    assert len(long["chosen_input_ids"]) == 64 and long["chosen_input_ids"][-1] != tokenizer.eos_token_id

    # Same file, tokenizer and settings: read back from the cache, nothing is tokenized again.
    monkeypatch.setattr(pairs_module, "tokenize_pairs", lambda *a, **k: pytest.fail("tokenized twice"))
    again, report_again = build_pair_splits(path, **kwargs)
    assert report_again == report and again["train"]["chosen_input_ids"] == splits["train"]["chosen_input_ids"]
    assert not list((tmp_path / "cache").glob("*.tmp-*"))


def test_collator_stacks_chosen_then_rejected():
    batch = PairCollator(pad_token_id=0)(
        [
            {"chosen_input_ids": [5, 6, 7], "rejected_input_ids": [5, 8]},
            {"chosen_input_ids": [9], "rejected_input_ids": [9, 4, 4, 4]},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [9, 0, 0, 0], [5, 8, 0, 0], [9, 4, 4, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]


def test_demo_pairs_prefer_the_exact_answer(tmp_path):
    pairs = make_demo_pairs(330, seed=1)
    assert pairs == make_demo_pairs(330, seed=1)
    records = make_demo_records(330, seed=1)
    assert [p["chosen"] for p in pairs] == [r["output"] for r in records]
    assert [p["prompt"] for p in pairs] == [format_prompt(r["instruction"], r["input"]) for r in records]
    assert all(p["rejected"] != p["chosen"] for p in pairs)
    assert {p["kind"] for p in pairs} == set(KINDS)
    for p in pairs:
        if p["kind"] == "truncated":
            assert p["chosen"].startswith(p["rejected"])
        elif p["kind"] == "run_on":
            assert p["rejected"].startswith(p["chosen"]) and len(p["rejected"]) > len(p["chosen"])
        elif p["kind"] == "other":  # an answer copied from the prompt, against one the prompt does not hold
            assert all(item in p["prompt"] for item in re.split(r", |、| ", p["chosen"]))
            assert not all(item in p["prompt"] for item in re.split(r", |、| ", p["rejected"]))

    path = write_demo_pairs_file(tmp_path / "demo" / "p.json", num_records=60, seed=0)
    read, report = read_comparison_pairs(path)
    assert len(read) == 60 and report["layouts"] == {"plain": 60} and report["prompts_already_templated"] == 60


def test_prepare_audits_the_demo_pairs(tmp_path):
    from gpt4llm.prepare import prepare
    from helpers.configs import TINY_OVERRIDES, compose_train

    cfg = compose_train(
        [
            "task=rm",
            "data=demo_pairs",
            f"paths.data_dir={tmp_path / 'data'}",
            *TINY_OVERRIDES,
            "data.demo.num_records=120",
            "data.val_size=20",
        ]
    )
    cfg.paths.output_dir = str(tmp_path / "run")
    (tmp_path / "run").mkdir()
    report = prepare(cfg)
    assert report["splits"] == {"train": 100, "validation": 20} and report["ties_dropped"] == 0
    row = json.loads((tmp_path / "run" / "prepared" / "validation.jsonl").read_text().splitlines()[0])
    assert set(row) == {"index", "chosen_input_ids", "rejected_input_ids"}


@pytest.mark.parametrize("template", ["alpaca", "chatml"])
def test_a_prompt_longer_than_half_the_length_loses_its_start_not_the_answers(tmp_path, tiny_model_dir, template):
    """Issue 38: right truncation alone cut a long prompt's two answers away, and the pair was dropped as identical.
    As TRL cuts one: the prompt keeps its last max_length // 2 tokens (and a leading BOS), the answers follow, the cut
    is counted, and a score of the chosen response (reward_ids) sees the very ids training saw."""
    from gpt4llm.data.formats import prompt_format
    from gpt4llm.data.formats.chat import render
    from gpt4llm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    fmt = prompt_format(template)
    fmt.prepare_tokenizer(tokenizer)
    question = "Summarise: " + " ".join(f"w{i}" for i in range(60))
    records = [{"prompt": question, "chosen": "short answer", "rejected": "another reply"}]
    records += [{"prompt": f"Say {i}.", "chosen": str(i), "rejected": str(i + 1)} for i in range(6)]
    kwargs = dict(settings=SplitSettings(max_length=64, val_size=1, template=template), cache_dir=tmp_path / "cache")
    splits, report = build_pair_splits(write(tmp_path, records), tokenizer, **kwargs)
    assert "identical after tokenization" not in report["dropped_pairs"]
    assert report["prompt_cut"] == {"count": 1, "first_indices": [0]} and report["truncated"]["count"] == 1
    row = next(r for split in splits.values() for r in split if r["index"] == 0)
    assert row["chosen_input_ids"] != row["rejected_input_ids"]

    # the ids, from the tokenizer directly: the whole text, the prompt's start cut to leave it 32 tokens
    if template == "alpaca":
        prompt, whole = format_prompt(question), format_prompt(question) + "short answer" + tokenizer.eos_token
        encode = lambda text: tokenizer(text)["input_ids"]  # noqa: E731
    else:
        conversation = [{"role": "user", "content": question}]
        prompt = render(tokenizer, [conversation], add_generation_prompt=True)[0]
        whole = render(tokenizer, [conversation + [{"role": "assistant", "content": "short answer"}]])[0]
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    ids, prompt_tokens = encode(whole), len(encode(prompt))
    assert prompt_tokens > 32 and len(ids) > 64
    keep = 1 if ids[0] == tokenizer.bos_token_id else 0
    expected = (ids[:keep] + ids[keep + prompt_tokens - 32 :])[:64]
    assert row["chosen_input_ids"] == expected and row["chosen_prompt_tokens"] == 32
    assert (
        tokenizer.decode(expected[row["chosen_prompt_tokens"] :], skip_special_tokens=True)
        .strip()
        .startswith("short answer")
    )
    assert fmt.reward_ids(tokenizer, [fmt.score_prompt({"prompt": question})], ["short answer"], 64) == [expected]
