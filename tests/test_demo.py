"""The demo tasks: deterministic by seed, distinct prompts, both languages, with and without input, exact answers."""

from __future__ import annotations

import json
import re

from gpt4llm.data.demo import TASKS, make_demo_records, write_demo_file


def test_deterministic_and_distinct():
    records = make_demo_records(2000, seed=3)
    assert records == make_demo_records(2000, seed=3) and records != make_demo_records(2000, seed=4)
    assert len({(r["instruction"], r["input"]) for r in records}) == 2000


def test_covers_both_languages_and_both_templates():
    records = make_demo_records(len(TASKS) * 3)
    has_chinese = [bool(re.search(r"[\u4e00-\u9fff]", r["instruction"])) for r in records]
    assert any(has_chinese) and not all(has_chinese)
    assert any(r["input"] for r in records) and any(not r["input"] for r in records)


def test_answers_follow_from_the_prompt():
    for r in make_demo_records(400, seed=1):
        if r["instruction"] == "Sort the numbers in ascending order.":
            numbers = [int(x) for x in r["input"].split(", ")]
            assert r["output"] == ", ".join(map(str, sorted(numbers)))
        elif r["instruction"] == "Reverse the order of the words.":
            assert r["output"].split() == r["input"].split()[::-1]
        elif m := re.fullmatch(r"Which number is larger, (\d+) or (\d+)\?", r["instruction"]):
            assert int(r["output"]) == max(int(m[1]), int(m[2]))
        elif r["instruction"] == "How many words are in the text?":
            assert int(r["output"]) == len(r["input"].split())


def test_written_file_is_alpaca_json(tmp_path):
    path = write_demo_file(tmp_path / "demo" / "d.json", num_records=50, seed=0)
    assert json.loads(path.read_text(encoding="utf-8")) == make_demo_records(50, 0)
    assert [p.name for p in path.parent.iterdir()] == ["d.json"]
