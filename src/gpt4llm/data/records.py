"""Reading Alpaca-format record files (`instruction`, optional `input`, `output`) with errors a user can act on.

Structural problems (unparsable JSON, a record that is not an object, a missing or non-string field) stop with a
message naming the file, the record index and the field, unless `skip_invalid` is set, in which case they are
counted like the problems a user would rather skip (empty instruction or output, exact duplicates).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class RecordError(ValueError):
    """A record file that cannot be used as it is; the message names file, record and field."""


@dataclass
class LoadReport:
    path: str
    total: int = 0
    kept: int = 0
    # reason -> indices (0-based, in file order) of the records skipped for it
    skipped: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))

    def summary(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "records": self.total,
            "kept": self.kept,
            "skipped": {reason: {"count": len(ix), "first_indices": ix[:10]} for reason, ix in self.skipped.items()},
        }


def read_json_records(path: str | Path) -> list[Any]:
    """A JSON list or a JSONL file (one object per line) as a list of records."""
    path = Path(path)
    if path.is_dir():
        raise RecordError(f"{path}: a directory, not a records file: point at a .json list or a .jsonl file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RecordError(f"{path}: not UTF-8 text ({err})") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg != "Extra data":  # anything but "a second JSON value follows" is a malformed file
            raise RecordError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from err
        if text.lstrip().startswith("["):  # a whole list, then more: the error is where the list ends, not in line 1
            raise RecordError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: text after the list's end)") from err
        data = _read_jsonl(path, text)
    if isinstance(data, dict):  # a one-line JSONL file parses as a single object
        data = [data]
    if not isinstance(data, list):
        raise RecordError(f"{path}: expected a JSON list of records or JSONL, got a JSON {type(data).__name__}")
    return data


def _read_jsonl(path: Path, text: str) -> list[Any]:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise RecordError(f"{path}: line {lineno} is not valid JSON (column {err.colno}: {err.msg})") from err
    return records


def load_instruction_records(path: str | Path, skip_invalid: bool = False) -> tuple[list[dict], LoadReport]:
    """Valid, de-duplicated Alpaca records, each with its file index under `index`, and what was skipped."""
    raw = read_json_records(path)
    report = LoadReport(path=str(path), total=len(raw))
    seen: dict[tuple[str, str, str], int] = {}
    records = []
    for index, record in enumerate(raw):
        problem = _structural_problem(record)
        if problem:
            if not skip_invalid:
                raise RecordError(f"{path}: record {index}: {problem} (set data.skip_invalid=true to skip such records)")
            report.skipped[problem].append(index)
            continue
        instruction, input_, output = record["instruction"], record.get("input", ""), record["output"]
        if not instruction.strip():
            report.skipped["empty instruction"].append(index)
        elif not output.strip():
            report.skipped["empty output"].append(index)
        elif (instruction, input_, output) in seen:
            report.skipped["duplicate record"].append(index)
        else:
            seen[(instruction, input_, output)] = index
            records.append({"index": index, "instruction": instruction, "input": input_, "output": output})
    report.kept = len(records)
    report.skipped = dict(report.skipped)
    return records, report


def unicode_problem(text: str) -> str | None:
    """Why `text` cannot be stored (a lone surrogate such as "\\ud800" from a broken escape), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"holds a lone surrogate at character {err.start} (not valid Unicode)"
    return None


def _structural_problem(record: Any) -> str | None:
    if not isinstance(record, dict):
        return f"is a JSON {type(record).__name__}, not an object with 'instruction', 'input', 'output'"
    for name in ("instruction", "output"):
        if name not in record:
            return f"field '{name}' is missing"
    for name in ("instruction", "input", "output"):
        if name in record and not isinstance(record[name], str):
            return f"field '{name}' is {type(record[name]).__name__}, not a string"
        if name in record and (problem := unicode_problem(record[name])):
            return f"field '{name}' {problem}"
    return None
