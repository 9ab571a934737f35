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

from gpt4llm.data.conversations import (
    ALPACA_FIELDS,
    CONVERSATION_KEYS,
    RecordProblem,
    TurnProblem,
    check_turns,
    read_conversation,
)
from gpt4llm.errors import MissingFileError, RecordError
from gpt4llm.io.json_files import read_json_records


@dataclass
class LoadReport:
    path: str
    total: int = 0
    kept: int = 0
    # reason -> indices (0-based, in file order) of the records skipped for it
    skipped: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    # fields the records had that training does not use (an `id`, a `source`, ...) -> how many records had them
    unused_fields: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "records": self.total,
            "kept": self.kept,
            "unused_fields": dict(sorted(self.unused_fields.items())),
            "skipped": {reason: {"count": len(ix), "first_indices": ix[:10]} for reason, ix in self.skipped.items()},
        }


def read_records(path: str | Path) -> list[Any]:
    """Records from any file `datasets` reads: a JSON list or JSONL (our own reader, for errors that name the line),
    Parquet, CSV (every cell as text), an Arrow file, or a directory written by `datasets`' save_to_disk. A file that
    cannot be read, or holds no records, is a RecordError naming it and what to do."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path}: no such file")
    if path.is_dir():
        records = _read_saved(path)
    elif path.suffix.lower() == ".csv":
        records = _read_csv(path)
    elif path.suffix.lower() == ".parquet":
        records = _read_parquet(path)
    elif path.suffix.lower() == ".arrow":
        records = _read_arrow(path)
    else:
        records = read_json_records(path)
    if not records:
        raise RecordError(f"{path}: holds no records: put the records in it, or point data.path at another file")
    return records


def _read_saved(path: Path) -> list[Any]:
    if not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
        raise RecordError(f"{path}: a directory, but not one `datasets` saved (save_to_disk): point at a data file")
    from datasets import DatasetDict, load_from_disk

    data = load_from_disk(str(path))
    if isinstance(data, DatasetDict):
        # Another split in place of a missing "train" would train on validation or test data without a word.
        if "train" not in data:
            raise RecordError(
                f"{path}: saved splits {', '.join(data)}, none of them 'train': set data.split to the one to use "
                f"(or point at its directory, {path}/<split>)"
            )
        data = data["train"]
    return data.to_list()


def _read_csv(path: Path) -> list[Any]:
    import pandas as pd

    try:
        # Every cell as text: pandas would read "None", "NA", "N/A", "null" or "nan" as missing, and a column of
        # numbers ("47") as ints; an empty cell stays "" (no input).
        table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RecordError(
            f"{path}: not UTF-8 text ({err.encoding} decoding failed: {err.reason}): save it as UTF-8 "
            f"(e.g. iconv -f latin1 -t utf-8 {path.name} > utf8_{path.name})"
        ) from None
    except pd.errors.EmptyDataError:
        raise RecordError(
            f"{path}: an empty file: write a header line (instruction,input,output) and one row per record"
        ) from None
    except pd.errors.ParserError as err:
        raise RecordError(f"{path}: not valid CSV ({str(err).strip()})") from None
    return table.to_dict("records")


def _read_parquet(path: Path) -> list[Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as err:  # 0 bytes, cut short, another format under a .parquet name
        raise RecordError(
            f"{path}: not a readable Parquet file ({err}): write it again, or convert it to JSONL"
        ) from None


def _read_arrow(path: Path) -> list[Any]:
    from datasets import load_dataset

    try:
        return load_dataset("arrow", data_files=str(path), split="train").to_list()
    except Exception as err:  # datasets' and pyarrow's many error types for a file it cannot read
        raise RecordError(
            f"{path}: not a readable Arrow file ({type(err).__name__}: {str(err)[:200]}): write it again "
            f"(Dataset.save_to_disk), or convert it to JSONL"
        ) from None


class Skip(Exception):
    """A record that is well-formed but cannot be trained in the paper's single-turn template (a counted skip)."""


def as_alpaca(record: Any) -> tuple[dict[str, Any], set[str]]:
    """A record of a common instruction layout as Alpaca fields, and the fields it had that are not used.

    Alpaca (instruction, input, output); LLaMA-Factory's Alpaca (plus `system` and `history`: a record that uses
    either cannot be put in the paper's template, and is skipped); single-turn ShareGPT `conversations` and OpenAI
    `messages`, read by the message layer (data.conversations), the user turn as the instruction."""
    if not isinstance(record, dict):
        return record, set()
    key = next((k for k in CONVERSATION_KEYS if k in record), None)
    if key is not None:
        try:
            conversation = read_conversation(record)
        except RecordProblem:
            return {"instruction": None}, set()  # reported as a structural problem below
        roles = [m["role"] for m in conversation.messages]
        if "system" in roles:
            raise Skip(f"{key} has a system turn (the paper's template has none)")
        if roles != ["user", "assistant"]:
            raise Skip(f"{key} is not one user turn and one assistant turn ({len(roles)} turns)")
        if conversation.untrained:
            raise Skip(f"{key}: its assistant turn has weight 0 (not to be trained on)")
        user, assistant = (m["content"] for m in conversation.messages)
        return {"instruction": user, "input": "", "output": assistant}, conversation.unused
    for name, reason in (("history", "history (earlier turns)"), ("system", "a system prompt")):
        if record.get(name):
            raise Skip(f"has {reason}: the paper's template has no place for it")
    fields = {k: record[k] for k in ALPACA_FIELDS if k in record}
    return fields, set(record) - set(ALPACA_FIELDS) - {"history", "system"}


def load_conversations(path: str | Path, skip_invalid: bool = False) -> tuple[list[dict], LoadReport]:
    """Every record as a conversation (`index`, `messages`) that a chat template can train on, de-duplicated, and what
    was skipped. A record that cannot be read, or whose turns are out of order, empty or of an unknown role, stops
    with the file, record and turn, unless `skip_invalid`."""
    raw = read_records(path)
    report = LoadReport(path=str(path), total=len(raw))
    seen: set[str] = set()
    records = []
    for index, record in enumerate(raw):
        try:
            conversation = read_conversation(record)
            check_turns(conversation.messages)
            for i, message in enumerate(conversation.messages):
                if problem := unicode_problem(message["content"]):
                    raise TurnProblem(f"turn {i}: {problem}")
        except (RecordProblem, TurnProblem) as problem:
            if not skip_invalid:
                raise RecordError(
                    f"{path}: record {index}: {problem} (set data.skip_invalid=true to skip such records)"
                ) from None
            report.skipped[str(problem)].append(index)
            continue
        for name in conversation.unused:
            report.unused_fields[name] = report.unused_fields.get(name, 0) + 1
        assistant_turns = sum(m["role"] == "assistant" for m in conversation.messages)
        if len(conversation.untrained) == assistant_turns:
            report.skipped["every assistant turn has weight 0"].append(index)
            continue
        key = json.dumps([conversation.messages, conversation.untrained], ensure_ascii=False)
        if key in seen:
            report.skipped["duplicate record"].append(index)
            continue
        seen.add(key)
        records.append({"index": index, "messages": conversation.messages, "untrained": list(conversation.untrained)})
    report.kept = len(records)
    report.skipped = dict(report.skipped)
    check_kept(path, report)
    return records, report


def load_instruction_records(path: str | Path, skip_invalid: bool = False) -> tuple[list[dict], LoadReport]:
    """Valid, de-duplicated Alpaca records, each with its file index under `index`, and what was skipped."""
    raw = read_records(path)
    report = LoadReport(path=str(path), total=len(raw))
    seen: dict[tuple[str, str, str], int] = {}
    records = []
    for index, record in enumerate(raw):
        try:
            record, unused = as_alpaca(record)
        except Skip as reason:
            report.skipped[str(reason)].append(index)
            continue
        for name in unused:
            report.unused_fields[name] = report.unused_fields.get(name, 0) + 1
        problem = _structural_problem(record)
        if problem:
            if not skip_invalid:
                raise RecordError(
                    f"{path}: record {index}: {problem} (set data.skip_invalid=true to skip such records)"
                )
            report.skipped[problem].append(index)
            continue
        instruction, input_, output = record["instruction"], record.get("input") or "", record["output"]
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
    check_kept(path, report)
    return records, report


def check_kept(path: str | Path, report: LoadReport) -> None:
    """A file all of whose records were skipped is an error that counts the reasons, not an empty dataset."""
    if report.kept == 0:
        reasons = "; ".join(f"{reason}: {len(indices)}" for reason, indices in report.skipped.items())
        raise RecordError(
            f"{path}: none of its {report.total} records can be used ({reasons}): fix them, "
            f"or point data.path at another file"
        )


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
        if name == "input" and record.get(name) is None:
            continue  # absent, or null in a table format: no input
        if name in record and not isinstance(record[name], str):
            return f"field '{name}' is {type(record[name]).__name__}, not a string"
        if name in record and (problem := unicode_problem(record[name])):
            return f"field '{name}' {problem}"
    return None
