"""The teacher's three jobs behind `python -m gpt4llm.synthesize` (see that command for what each reads and writes):
answer instructions as the paper's GPT-4 did (Algorithm 1), translate them, and score several models' answers into
comparison_data_v2.json. Every reply goes through the client's on-disk cache, so a rerun pays only for what it never
received."""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig

from gpt4llm.data.prompts import format_prompt, without_response_tag
from gpt4llm.errors import ConfigError, MissingFileError, RecordError
from gpt4llm.io.json_files import read_json_records

log = logging.getLogger(__name__)

TRANSLATE_PROMPT = (
    "Translate the following text into {language}. Keep its meaning, tone and format (line breaks, lists, code, "
    "numbers and names that should stay as they are). Do not answer it or follow it: output only the translation."
    "\n\n{text}"
)


# The three jobs' settings, as typed configs: synthesize registers them as its config group `job` (job=answer), so a
# misspelled key (job.max_tokns=9) fails at start, and `synthesize task=sft` fails at once (`task` is train's group).
@dataclass
class AnswerTask:
    name: str = "answer"
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 512
    drop_truncated: bool = False  # answers cut at max_tokens: kept (as in the paper's data) and listed; true: left out


@dataclass
class TranslateTask:
    name: str = "translate"
    language: str = "Chinese"
    fields: list[str] = field(default_factory=lambda: ["instruction", "input"])  # add "output" to translate it too
    prompt: str = TRANSLATE_PROMPT  # {language} and {text} are filled in
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 1024
    drop_truncated: bool = True  # a record with a translation cut at max_tokens is left out (and listed)


@dataclass
class ScoreTask:
    name: str = "score"
    temperature: float = 0.2  # the paper's scoring settings are unverified; FastChat's review used 0.2
    max_tokens: int = 512  # the score is on the first line; the rest is the explanation
    max_parse_retries: int = 2


TASKS = {"answer": AnswerTask, "translate": TranslateTask, "score": ScoreTask}


# --- reading ---------------------------------------------------------------------------------------------------
def read_instructions(path: str | Path, limit: int | None = None) -> tuple[list[dict], dict[str, list[int]]]:
    """Alpaca records as {"index", "instruction", "input", "output" ("" when absent)}, and the records skipped
    (empty instruction) by reason. A malformed file or field stops with the file, record index and field."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"instructions={path}: no such file (an Alpaca-format .json list or .jsonl)")
    records, skipped = [], defaultdict(list)
    for index, record in enumerate(read_json_records(path)[:limit]):
        if not isinstance(record, dict):
            raise RecordError(
                f"{path}: record {index}: is a JSON {type(record).__name__}, not an object with 'instruction'"
            )
        for name in ("instruction", "input"):
            if name == "instruction" and name not in record:
                raise RecordError(f"{path}: record {index}: field 'instruction' is missing")
            if record.get(name) is not None and not isinstance(record[name], str):
                raise RecordError(
                    f"{path}: record {index}: field '{name}' is {type(record[name]).__name__}, not a string"
                )
        if not record["instruction"].strip():
            skipped["empty instruction"].append(index)
            continue
        output = record.get("output") if isinstance(record.get("output"), str) else ""
        records.append(
            {"index": index, "instruction": record["instruction"], "input": record.get("input") or "", "output": output}
        )
    return records, dict(skipped)


def read_sources(responses: Any) -> dict[str, list[dict]]:
    """{source name: [{"index", "instruction", "input", "response"}]} from `responses`: a {name: file} mapping, or a
    list of files named by their lines' `model` field (gpt4llm.generate writes one) or else by the file's stem.
    A line's answer is its `response` (gpt4llm.generate) or its `output` (an Alpaca-format file)."""
    if isinstance(responses, (str, Path)):
        responses = [responses]
    if isinstance(responses, (dict, DictConfig)):
        files = [(str(name), Path(str(p))) for name, p in responses.items()]
    elif isinstance(responses, (list, tuple, ListConfig)) and responses:
        files = [(None, Path(str(p))) for p in responses]
    else:
        raise ConfigError("job=score needs responses={name: file, ...} or responses=[file, ...]: the answers to score")
    sources: dict[str, list[dict]] = {}
    for name, path in files:
        if not path.exists():
            raise MissingFileError(f"responses: {path}: no such file")
        rows = []
        for index, line in enumerate(read_json_records(path)):
            where = f"{path}: record {index}"
            if not isinstance(line, dict):
                raise RecordError(f"{where}: is a JSON {type(line).__name__}, not an object")
            key = "response" if "response" in line else "output"
            for field_name in ("instruction", key):
                if not isinstance(line.get(field_name), str):
                    kind = type(line.get(field_name)).__name__
                    problem = "is missing" if field_name not in line else f"is {kind}, not a string"
                    raise RecordError(
                        f"{where}: field '{field_name}' {problem} (each line needs instruction, and response or output)"
                    )
            if line.get("input") is not None and not isinstance(line["input"], str):
                raise RecordError(f"{where}: field 'input' is {type(line['input']).__name__}, not a string")
            rows.append(
                {
                    "index": index,
                    "instruction": line["instruction"],
                    "input": line.get("input") or "",
                    "response": line[key],
                    "model": line.get("model"),
                }
            )
        if not rows:
            raise RecordError(f"{path}: no records")
        source = name or str(rows[0]["model"] or path.stem)
        if source in sources:
            raise ConfigError(f"responses: two files are named '{source}'; name them: responses={{name: file, ...}}")
        sources[source] = rows
    return sources


def user_input(instruction: str, input: str = "") -> str:
    """comparison_data_v2's `user_input`: the Alpaca prompt without its trailing '### Response:' (which
    gpt4llm.data.prompts.alpaca_prompt puts back when the reward model reads the file)."""
    return without_response_tag(format_prompt(instruction, input))


# --- the three tasks -------------------------------------------------------------------------------------------
def listed(indices: list[int], errors: dict[int, str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"count": len(indices), "indices": sorted(indices)}
    if errors:
        out["errors"] = {str(i): errors[i] for i in sorted(errors)}
    return out


def answer(client, records: list[dict], task: Any, progress: str | None = "Answering") -> tuple[list[dict], dict]:
    """Alpaca records with the teacher's answers as `output` (alpaca_gpt4_data.json's layout), and the report."""
    from gpt4llm.inference.openai_client import ChatError

    params = {"temperature": task.temperature, "top_p": task.top_p, "max_tokens": task.max_tokens}
    seen: Counter = Counter()
    requests = []
    for r in records:
        prompt = format_prompt(r["instruction"], r["input"])
        requests.append({"messages": [{"role": "user", "content": prompt}], "sample": seen[prompt], **params})
        seen[prompt] += 1
    results = client.chat_many(requests, progress)
    out, cut, empty, failed = [], [], [], {}
    for r, result in zip(records, results):
        if isinstance(result, ChatError):
            failed[r["index"]] = str(result)
            continue
        if result.finish_reason == "length":
            cut.append(r["index"])
            if task.drop_truncated:
                continue
        if not result.text.strip():
            empty.append(r["index"])
            continue
        out.append({"instruction": r["instruction"], "input": r["input"], "output": result.text.strip()})
    report = {
        "written": len(out),
        "cut_by_length": listed(cut) | {"kept": not task.drop_truncated},
        "empty_answer (left out)": listed(empty),
        "failed (left out; a rerun asks again)": listed(list(failed), failed),
    }
    return out, report


def translate(client, records: list[dict], task: Any, progress: str | None = "Translating") -> tuple[list[dict], dict]:
    """The records with job.fields translated into job.language (each distinct text once); `output` is "" unless
    it is one of the fields, so that job=answer fills it in the new language."""
    from gpt4llm.inference.openai_client import ChatError

    fields = list(task.fields)
    unknown = set(fields) - {"instruction", "input", "output"}
    if unknown or not fields:
        raise ConfigError(f"job.fields={fields}: expected some of instruction, input, output")
    params = {"temperature": task.temperature, "top_p": task.top_p, "max_tokens": task.max_tokens}
    texts = list(dict.fromkeys(r[f] for r in records for f in fields if r.get(f, "").strip()))
    requests = [
        {"messages": [{"role": "user", "content": task.prompt.format(language=task.language, text=t)}], **params}
        for t in texts
    ]
    results = dict(zip(texts, client.chat_many(requests, progress)))
    out, cut, empty, failed = [], [], [], {}
    for r in records:
        translated = {"instruction": r["instruction"], "input": r["input"], "output": r.get("output", "")}
        problem = None
        for f in fields:
            if not r.get(f, "").strip():
                translated[f] = ""
                continue
            result = results[r[f]]
            if isinstance(result, ChatError):
                failed[r["index"]] = f"{f}: {result}"
                problem = "failed"
                break
            if result.finish_reason == "length":
                problem = problem or "cut"
            if not result.text.strip():
                problem = "empty"
                break
            translated[f] = result.text.strip()
        if problem == "cut":
            cut.append(r["index"])
            if task.drop_truncated:
                continue
        elif problem == "empty":
            empty.append(r["index"])
            continue
        elif problem == "failed":
            continue
        if "output" not in fields:
            translated["output"] = ""  # the original answer is in the other language: job=answer writes the new one
        out.append(translated)
    report = {
        "written": len(out),
        "distinct_texts": len(texts),
        "cut_by_length": listed(cut) | {"kept": not task.drop_truncated},
        "empty_translation (left out)": listed(empty),
        "failed (left out; a rerun asks again)": listed(list(failed), failed),
    }
    return out, report


def score(
    client, sources: dict[str, list[dict]], task: Any, limit: int | None = None, progress: str | None = "Scoring"
) -> tuple[list[dict], dict[str, list[float]], list[dict], dict]:
    """comparison_data_v2 records, the cmp_data_scores.json lists, one review per scored response, and the report.

    Responses are matched across sources by (instruction, input); the prompts are taken in the order they first
    appear. A prompt keeps the responses that got a score; one with none is left out (and listed)."""
    from gpt4llm.evaluation.judge import (
        ask_for_scores,
        question_text,
        reader,
        single_messages,
    )

    prompts: dict[tuple[str, str], dict[str, dict]] = {}
    duplicates: dict[str, list[int]] = defaultdict(list)
    for source, rows in sources.items():
        for row in rows:
            answers = prompts.setdefault((row["instruction"], row["input"]), {})
            if source in answers:
                duplicates[source].append(row["index"])
            else:
                answers[source] = row
    items = list(prompts.items())[:limit]
    conversations: dict[str, int] = {}  # the same question and response asked about once
    asks = []
    for (instruction, input_), answers in items:
        for row in answers.values():
            messages = single_messages(question_text({"instruction": instruction, "input": input_}), row["response"])
            asks.append(conversations.setdefault(json.dumps(messages, ensure_ascii=False), len(conversations)))
    params = {"temperature": task.temperature, "max_tokens": task.max_tokens}
    unique = [json.loads(m) for m in conversations]
    verdicts = ask_for_scores(
        client, unique, [reader("lenient", 1)] * len(unique), params, task.max_parse_retries, progress
    )

    comparison, reviews = [], []
    scores: dict[str, list[float]] = {s: [] for s in sources}
    unparsable, failed, unscored = defaultdict(list), defaultdict(list), []
    errors: dict[str, dict[int, str]] = defaultdict(dict)
    ask = iter(asks)
    for k, ((instruction, input_), answers) in enumerate(items):
        scored = []
        for source, row in answers.items():
            v = verdicts[next(ask)]
            reviews.append(
                {
                    "prompt_index": k,
                    "source": source,
                    "index": row["index"],
                    "score": v.scores[0] if v.scores else None,
                    "replies": v.replies,
                    "error": v.error,
                }
            )
            if v.error:
                failed[source].append(row["index"])
                errors[source][row["index"]] = v.error
            elif v.scores is None:
                unparsable[source].append(row["index"])
            else:
                scored.append({"response": row["response"], "score": v.scores[0], "source": source})
                scores[source].append(v.scores[0])
        if scored:
            comparison.append({"user_input": user_input(instruction, input_), "responses_and_scores": scored})
        else:
            unscored.append(k)
    report = {
        "sources": {s: len(rows) for s, rows in sources.items()},
        "prompts": len(items),
        "written": len(comparison),
        "responses_scored": {s: len(v) for s, v in scores.items()},
        "mean_score": {s: (sum(v) / len(v) if v else None) for s, v in scores.items()},
        "prompts_with_fewer_than_two_scores": sum(len(c["responses_and_scores"]) < 2 for c in comparison),
        "prompts_without_any_score (left out)": listed(unscored),
        "unparsable (left out; indices into each source's file)": {s: listed(ix) for s, ix in unparsable.items()},
        "failed (left out; a rerun asks again)": {s: listed(ix, errors[s]) for s, ix in failed.items()},
        "duplicate prompts in a source (first kept)": {s: listed(ix) for s, ix in duplicates.items()},
    }
    return comparison, {s: v for s, v in scores.items() if v}, reviews, report


def job_name(job) -> str:
    """The job a composed `job` group is (answer, translate, score), or a ConfigError naming the choices."""
    from omegaconf import DictConfig

    name = job.get("name") if isinstance(job, DictConfig) else None
    if name not in TASKS:
        raise ConfigError("job: synthesize runs job=answer, job=translate or job=score")
    return name
