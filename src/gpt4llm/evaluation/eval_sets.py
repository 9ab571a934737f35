"""The evaluation sets, read from their original layouts into one record shape:

    {"id", "instruction", "input", "category" (when the set has one), "reference" (when it has one)}

| format        | original file                        | fields used                                                  |
| vicuna        | vicuna_question_80.jsonl (FastChat)  | question_id -> id, text -> instruction, category             |
| user_oriented | user_oriented_instructions.jsonl     | id, instruction, instances[0].input / .output -> reference,  |
|               | (self-instruct)                      | motivation_app -> category                                    |
| unnatural     | unnatural_instruction_gpt4_data.json | index -> id, instruction, input, label -> reference           |
|               | (GPT-4-LLM)                          | (`output` is GPT-4's answer, not the reference)               |
| alpaca        | any Alpaca-format file               | index -> id, instruction, input, output -> reference          |
| demo          | none: generated                      | held-out demo tasks, output -> reference                      |

Files are downloaded on first use through `ensure_file` (atomic, validated; offline, or with HF_HUB_OFFLINE=1, it says
where to put them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpt4llm.data.sources import ensure_file
from gpt4llm.errors import ConfigError, RecordError
from gpt4llm.io.json_files import read_json_records

# The fields each layout must have; a download without them is rejected, a local file names the missing one.
REQUIRED = {
    "vicuna": ("question_id", "text"),
    "user_oriented": ("id", "instruction", "instances"),
    "unnatural": ("instruction", "label"),
    "alpaca": ("instruction", "output"),
}


def load_eval_set(
    format: str,
    path: str | None = None,
    url: str | None = None,
    checksum: str | None = None,
    num_records: int | None = None,
    demo: dict | None = None,
    **_: Any,  # name and other descriptive keys of conf/eval/*.yaml
) -> list[dict[str, Any]]:
    if format == "demo":
        return demo_eval_records(**(demo or {}))
    if format not in REQUIRED:
        raise ConfigError(f"eval.format={format!r}: expected one of {', '.join([*REQUIRED, 'demo'])}")
    file = ensure_file(
        path, url, checksum=checksum, num_records=num_records, required_fields=REQUIRED[format], setting="eval.path"
    )
    raw = read_json_records(file)
    records = [_convert(format, file, index, record) for index, record in enumerate(raw)]
    seen: dict[str, int] = {}
    for index, record in enumerate(records):
        if str(record["id"]) in seen:
            raise RecordError(f"{file}: record {index}: id {record['id']!r} repeats record {seen[str(record['id'])]}")
        seen[str(record["id"])] = index
    return records


def _convert(format: str, file: Path, index: int, record: Any) -> dict[str, Any]:
    def field(name: str, kind: type | tuple = str, source: Any = record, where: str = "") -> Any:
        if not isinstance(source, dict) or name not in source:
            raise RecordError(f"{file}: record {index}: field '{where}{name}' is missing")
        if not isinstance(source[name], kind):
            expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise RecordError(
                f"{file}: record {index}: field '{where}{name}' is {type(source[name]).__name__}, not {expected}"
            )
        return source[name]

    if format == "vicuna":
        out = {"id": field("question_id", (int, str)), "instruction": field("text"), "input": ""}
        if "category" in record:
            out["category"] = field("category")
        return out
    if format == "user_oriented":
        instances = field("instances", list)
        if not instances:
            raise RecordError(f"{file}: record {index}: field 'instances' is empty")
        first = instances[0]
        return {
            "id": field("id", (int, str)),
            "instruction": field("instruction"),
            "input": field("input", str, first, "instances[0]."),
            "category": field("motivation_app"),
            "reference": field("output", str, first, "instances[0]."),
        }
    if format == "unnatural":
        reference = field("label")
    else:  # alpaca
        reference = field("output")
    return {
        "id": index,
        "instruction": field("instruction"),
        "input": record.get("input") or "",
        "reference": reference,
    }


def demo_eval_records(
    num_records: int = 200, after: int = 4000, seed: int = 0, english_only: bool = True
) -> list[dict]:
    """Demo tasks the demo model never trained on: `make_demo_records` continues one seeded stream with distinct
    prompts, so the records after the first `after` (the training set's size, data.demo.num_records) are new."""
    from gpt4llm.data.demo import make_demo_records

    stream = make_demo_records(after + 3 * num_records, seed)
    records = []
    for index in range(after, len(stream)):
        r = stream[index]
        if english_only and not (r["instruction"] + r["input"] + r["output"]).isascii():
            continue
        task = r["instruction"].split(" ")[0].lower() if r["instruction"].isascii() else "zh"
        records.append(
            {
                "id": f"demo-{index}",
                "instruction": r["instruction"],
                "input": r["input"],
                "category": task,
                "reference": r["output"],
            }
        )
        if len(records) == num_records:
            return records
    raise ConfigError(f"eval.demo: only {len(records)} held-out records after {after}; ask for fewer")
