"""Reading model answers: ours (`gpt4llm.generate`'s JSON lines) and FastChat's answer files (Vicuna's release of
LLaMA, Alpaca, Vicuna, Bard, ChatGPT answers), into one shape: {"id", "response", "model", and whatever else the line
has (reference, category, instruction, input)}.

| layout   | id            | answer     | model name              |
| ours     | id            | response   | model                   |
| FastChat | question_id   | text       | model_id                |
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from gpt4llm.errors import MissingFileError, RecordError
from gpt4llm.io.json_files import read_json_records


def slug(name: str) -> str:
    """A model name as part of a file name."""
    return re.sub(r"[^\w.-]+", "_", name)


def read_responses(path: str | Path) -> list[dict[str, Any]]:
    """The answers in `path`; a line in neither layout stops with the file, line and field. Ids are compared as
    strings everywhere (FastChat's are ints, ours follow the eval set)."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path}: no such responses file (write one with python -m gpt4llm.generate)")
    out, seen = [], set()
    for index, line in enumerate(read_json_records(path)):
        where = f"{path}: line {index + 1}"
        if not isinstance(line, dict):
            raise RecordError(f"{where}: a JSON {type(line).__name__}, not an object with 'id' and 'response'")
        if "response" in line:
            answer, key, name = dict(line), "response", line.get("model")
        elif "text" in line and "question_id" in line:  # FastChat's answer table
            answer = {k: v for k, v in line.items() if k not in ("question_id", "text", "model_id")}
            answer |= {"id": line["question_id"], "response": line["text"]}
            key, name = "text", line.get("model_id")
        else:
            raise RecordError(
                f"{where}: field 'response' is missing "
                "(expected gpt4llm.generate's lines, or FastChat's question_id/text)"
            )
        if "id" not in answer:
            raise RecordError(f"{where}: field 'id' is missing")
        if not isinstance(answer["response"], str):
            raise RecordError(f"{where}: field '{key}' is {type(answer['response']).__name__}, not a string")
        if str(answer["id"]) in seen:
            raise RecordError(f"{where}: id {answer['id']!r} appears twice")
        seen.add(str(answer["id"]))
        answer["model"] = str(name) if name else path.parent.name if path.stem == "responses" else path.stem
        out.append(answer)
    if not out:
        raise RecordError(f"{path}: no responses in the file")
    return out
