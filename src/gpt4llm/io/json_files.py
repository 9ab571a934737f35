"""JSON files, read and written in one place: a records file (a JSON list, or JSONL one object per line) read with
errors that name the file, line and column; JSON and JSONL written through the atomic writer (gpt4llm.io.atomic), so
a reader never finds half of one."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gpt4llm.errors import MissingFileError, RecordError
from gpt4llm.io.atomic import atomic_path, write_text


def read_json_records(path: str | Path) -> list[Any]:
    """A JSON list or a JSONL file (one object per line) as a list of records."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path}: no such file")
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
            raise RecordError(
                f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: text after the list's end)"
            ) from err
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


def write_json(target: str | Path, data, indent: int | None = 4, private: bool = False) -> Path:
    """`data` as JSON text (non-ASCII kept as is), with a final newline; owner-only (0600) with `private`."""
    return _write(target, json.dumps(data, ensure_ascii=False, indent=indent) + "\n", private)


def write_jsonl(target: str | Path, rows: Iterable[dict], private: bool = False) -> Path:
    """One JSON object per line; owner-only (0600) with `private`."""
    return _write(target, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), private)


def _write(target: str | Path, text: str, private: bool) -> Path:
    if not private:
        return write_text(target, text)
    with atomic_path(target, private=True) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)
