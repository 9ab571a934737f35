"""Bad record files: a clear error naming file, record and field, or a counted skip."""

from __future__ import annotations

import json

import pytest

from gpt4llm.data.records import load_instruction_records
from gpt4llm.errors import RecordError


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content, ensure_ascii=False), encoding="utf-8")
    return path


GOOD = {"instruction": "Say hi.", "input": "", "output": "hi"}


def test_json_and_jsonl_read_the_same(tmp_path):
    records = [
        GOOD,
        {"instruction": "Add.", "input": "1 and 2", "output": "3"},
        {"instruction": "No input field.", "output": "ok"},
    ]
    as_json, _ = load_instruction_records(write(tmp_path, "a.json", records))
    as_jsonl, _ = load_instruction_records(write(tmp_path, "a.jsonl", "\n".join(json.dumps(r) for r in records) + "\n"))
    assert as_json == as_jsonl
    assert [r["index"] for r in as_json] == [0, 1, 2]
    assert as_json[2]["input"] == ""


def test_malformed_json_names_file_and_position(tmp_path):
    path = write(tmp_path, "bad.json", '[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]')
    with pytest.raises(RecordError, match=r"bad\.json: not valid JSON \(line 2, column"):
        load_instruction_records(path)


def test_malformed_jsonl_line_is_named(tmp_path):
    path = write(tmp_path, "bad.jsonl", json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n{oops\n")
    with pytest.raises(RecordError, match=r"bad\.jsonl: line 3 is not valid JSON"):
        load_instruction_records(path)


def test_wrong_file_format(tmp_path):
    with pytest.raises(RecordError, match="expected a JSON list of records"):
        load_instruction_records(write(tmp_path, "n.json", "42"))


@pytest.mark.parametrize(
    "record, message",
    [
        ({"input": "", "output": "x"}, r"record 1: field 'instruction' is missing"),
        ({"instruction": "x", "input": ""}, r"record 1: field 'output' is missing"),
        ({"instruction": "x", "input": 3, "output": "y"}, r"record 1: field 'input' is int, not a string"),
        (["not", "an", "object"], r"record 1: is a JSON list, not an object"),
    ],
)
def test_structural_problems_name_record_and_field(tmp_path, record, message):
    path = write(tmp_path, "d.json", [GOOD, record])
    with pytest.raises(RecordError, match=message) as err:
        load_instruction_records(path)
    assert str(path) in str(err.value) and "data.skip_invalid=true" in str(err.value)


def test_skips_are_counted_with_their_indices(tmp_path):
    records = [
        GOOD,
        {"instruction": "Empty answer.", "input": "", "output": "  "},
        GOOD,  # duplicate of record 0
        {"instruction": " ", "input": "", "output": "x"},
        {"instruction": "bad", "output": 5},
        {"instruction": "Fine.", "input": "", "output": "yes"},
    ]
    kept, report = load_instruction_records(write(tmp_path, "d.json", records), skip_invalid=True)
    assert [r["index"] for r in kept] == [0, 5]
    assert report.total == 6 and report.kept == 2
    assert report.skipped == {
        "empty output": [1],
        "duplicate record": [2],
        "empty instruction": [3],
        "field 'output' is int, not a string": [4],
    }
