"""ROUGE by reference length equals rouge-score called directly on the same pairs, in the original files' layout;
the eval sets read from their original layouts; bad input is counted or named."""

from __future__ import annotations

import json
from statistics import mean

import pytest
from rouge_score.rouge_scorer import RougeScorer

from gpt4llm.errors import RecordError
from gpt4llm.evaluation.eval_sets import load_eval_set
from gpt4llm.evaluation.responses import read_responses
from gpt4llm.evaluation.rouge import evaluate_rouge, length_bucket, write_tables
from helpers.configs import SHARED_DATA
from helpers.fake_servers import FileServer

ORIGINAL = SHARED_DATA / "gpt4llm_plots"

PAIRS = [  # (reference, response): every bucket, stemming, an empty response, a reference rouge-score cannot tokenize
    ("yes", "Yes."),
    ("Paris", "The capital is Paris."),
    ("running dogs", "the dog runs"),
    ("apple river stone", "stone river apple"),
    ("the cats were playing outside", "cats play outside"),
    ("one two three four five six", ""),
    ("a quick brown fox jumps over the lazy dog today", "the quick brown fox jumped over a lazy dog"),
    (
        "Sort the numbers: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11 are sorted in ascending order here.",
        "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11",
    ),
    ("北京 上海", "北京"),
]


@pytest.mark.parametrize(
    "words, bucket", [(0, "0-2"), (2, "0-2"), (3, "3-5"), (5, "3-5"), (6, "6-10"), (10, "6-10"), (11, "10-")]
)
def test_length_buckets_are_words_of_the_reference(words, bucket):
    assert length_bucket(" ".join(["w"] * words)) == bucket


@pytest.mark.parametrize("use_stemmer", [True, False])
def test_table_equals_rouge_score_on_the_same_pairs(use_stemmer):
    answers = [{"id": i, "model": "m", "reference": ref, "response": resp} for i, (ref, resp) in enumerate(PAIRS)]
    answers.append({"id": 99, "model": "m", "response": "no reference"})
    tables, per_pair, problems = evaluate_rouge([answers], use_stemmer=use_stemmer)

    scorer = RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=use_stemmer)
    direct = [scorer.score(ref, resp) for ref, resp in PAIRS]
    for label in ("0-2", "3-5", "6-10", "10-", "ALL"):
        members = [i for i, (ref, _) in enumerate(PAIRS) if label == "ALL" or length_bucket(ref) == label]
        (row,) = tables[label]
        assert row["NumInstance"] == len(members) and row["Model"] == "m" and row["Length"] == label
        for name in ("rouge1", "rouge2", "rougeL"):
            assert row[name] == pytest.approx(mean(direct[i][name].fmeasure for i in members), abs=1e-12)
    assert len(per_pair) == len(PAIRS)
    assert problems["m"]["missing reference (left out)"] == {"count": 1, "first_ids": [99]}
    assert problems["m"]["empty response (scored 0)"]["first_ids"] == [5]
    assert problems["m"]["reference has no ROUGE tokens (scored 0)"]["first_ids"] == [8]


def test_stemming_is_what_the_option_says():
    answers = [{"id": 0, "model": "m", "reference": "running dogs", "response": "the dog runs"}]
    assert evaluate_rouge([answers], use_stemmer=True)[0]["ALL"][0]["rougeL"] > 0
    assert evaluate_rouge([answers], use_stemmer=False)[0]["ALL"][0]["rougeL"] == 0


def test_files_have_the_original_layout(tmp_path):
    a = [{"id": i, "model": "ours", "reference": ref, "response": resp} for i, (ref, resp) in enumerate(PAIRS)]
    b = [dict(x, model="theirs", response=x["reference"]) for x in a]
    tables, _, _ = evaluate_rouge([a, b])
    paths = write_tables(tables, tmp_path, "rouge")
    assert [p.name for p in paths] == [f"rouge_len{b}.json" for b in ("0-2", "3-5", "6-10", "10-", "ALL")]
    rows = json.loads((tmp_path / "rouge_lenALL.json").read_text())
    assert [r["Model"] for r in rows] == ["ours", "theirs"] and rows[1]["rougeL"] == pytest.approx(8 / 9)
    keys = ["Length", "NumInstance", "Model", "rouge1", "rouge2", "rougeL"]
    assert all(list(r) == keys for r in rows)
    if ORIGINAL.exists():  # the very keys, in the very order, of the paper's files
        original = json.loads(
            (
                ORIGINAL / "eval_unnatural_instructions" / "gpt4_unnatural_instruction_results_h9000_lenALL.json"
            ).read_text()
        )
        assert list(original[0]) == keys


def test_eval_sets_from_original_layouts(tmp_path):
    vicuna = tmp_path / "q.jsonl"
    vicuna.write_text(
        '{"question_id": 1, "text": "Hi?", "category": "generic"}\n'
        '{"question_id": 2, "text": "2+2?", "category": "math"}\n'
    )
    assert load_eval_set("vicuna", vicuna) == [
        {"id": 1, "instruction": "Hi?", "input": "", "category": "generic"},
        {"id": 2, "instruction": "2+2?", "input": "", "category": "math"},
    ]
    user = tmp_path / "u.jsonl"
    user.write_text(
        json.dumps(
            {
                "id": "t0",
                "motivation_app": "Gmail",
                "instruction": "Reply.",
                "instances": [{"input": "Hi", "output": "Hello"}],
            }
        )
    )
    assert load_eval_set("user_oriented", user) == [
        {"id": "t0", "instruction": "Reply.", "input": "Hi", "category": "Gmail", "reference": "Hello"}
    ]
    unnatural = tmp_path / "n.json"
    unnatural.write_text(json.dumps([{"instruction": "Add.", "input": "1 2", "output": "GPT-4 says 3", "label": "3"}]))
    assert load_eval_set("unnatural", unnatural) == [{"id": 0, "instruction": "Add.", "input": "1 2", "reference": "3"}]

    demo = load_eval_set("demo", demo={"num_records": 20, "after": 4000, "seed": 0})
    assert len(demo) == 20 and all(r["reference"] and r["instruction"].isascii() for r in demo)
    from gpt4llm.data.demo import make_demo_records

    trained = {(r["instruction"], r["input"]) for r in make_demo_records(4000, 0)}
    assert not [r for r in demo if (r["instruction"], r["input"]) in trained], "held-out demo tasks were trained on"


def test_eval_set_errors_name_file_record_and_field(tmp_path):
    bad = tmp_path / "u.jsonl"
    bad.write_text(
        json.dumps({"id": "t0", "motivation_app": "x", "instruction": "Reply.", "instances": [{"output": "Hello"}]})
    )
    with pytest.raises(RecordError, match=r"u\.jsonl: record 0: field 'instances\[0\]\.input' is missing"):
        load_eval_set("user_oriented", bad)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_eval_set("vicuna", tmp_path / "absent.jsonl")


@pytest.mark.skipif(not ORIGINAL.exists(), reason="../shared/data/gpt4llm_plots is not there")
def test_the_original_eval_files_load():
    assert len(load_eval_set("vicuna", ORIGINAL / "vicuna_question_80.jsonl", num_records=80)) == 80
    user = load_eval_set("user_oriented", ORIGINAL / "user_oriented_instructions.jsonl")
    assert len(user) == 252 and len({r["category"] for r in user}) == 71


def test_responses_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "responses.jsonl"
    path.write_text('{"id": 1, "response": "a"}\n{"id": 2, "answer": "b"}\n')
    with pytest.raises(RecordError, match=r"responses\.jsonl: line 2: field 'response' is missing"):
        read_responses(path)
    path.write_text('{"id": 1, "response": "a"}\n{"id": 1, "response": "b"}\n')
    with pytest.raises(RecordError, match="line 2: id 1 appears twice"):
        read_responses(path)


def test_eval_set_is_downloaded_when_missing(tmp_path, loopback):
    body = b'{"question_id": 1, "text": "Hi?", "category": "generic"}\n'
    server = loopback(FileServer, body=body)
    target = tmp_path / "eval" / "vicuna_question_80.jsonl"
    assert load_eval_set("vicuna", target, server.url, num_records=1)[0]["instruction"] == "Hi?"
    assert target.read_bytes() == body
