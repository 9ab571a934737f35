"""Synthesize: the paper's GPT-4 data, made again with any OpenAI-compatible teacher (GPT-4, a vLLM server, or
`python -m gpt4llm.serve` with a model trained here).

    python -m gpt4llm.synthesize task=answer instructions=alpaca_data.json teacher.model=gpt-4
    python -m gpt4llm.synthesize task=translate instructions=alpaca_data.json task.language=Chinese
    python -m gpt4llm.synthesize task=score 'responses={gpt4:a.json,text-davinci-003:b.json,icm-1.3b:c.jsonl}'

| task      | reads                               | writes (in the run directory)                                         |
| answer    | Alpaca records (instruction, input) | <name>.answers.json: instruction, input, output (alpaca_gpt4_data.json) |
| translate | Alpaca records                      | <name>.<language>.json: instruction, input translated; output ""      |
| score     | several models' answers to the      | comparison_data_v2.json (user_input, responses_and_scores) and        |
|           | same instructions                   | cmp_data_scores.json (the score lists gpt4llm.plots draws)            |

- answer: the paper's Algorithm 1, the Alpaca prompt as the one user message, temperature 1.0, top_p 1.0,
  max_tokens 512 (task.*). A record that appears k times gets sample k, i.e. its own draw, as each of the paper's
  records did.
- translate: each distinct instruction and input text translated once (the paper had ChatGPT translate Alpaca's
  instructions, then GPT-4 answer them in Chinese).
- score: every response scored on its own with the paper's scoring prompt (GPT-4-LLM issue #8, the one copy in
  evaluation/judge_prompts.py), the score read from the reply's first line by the judge's lenient rule; an unparsable reply
  is asked for again (a new sample) up to task.max_parse_retries times.

Every reply goes to the client's on-disk cache as it arrives, and the output is rebuilt from the cache: a killed run,
run again, loses nothing and pays only for what it never received. Answers cut at max_tokens (finish_reason "length"),
empty answers, unparsable scores and requests that failed after the client's retries are counted and listed by
record index (0-based, file order) in <output stem>.report.json, never dropped silently; a rerun asks for the failed
ones again. The teacher's key is read from the environment variable teacher.api_key_env and written nowhere.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

from gpt4llm.cli import CONFIG_PATH
from gpt4llm.data.records import RecordError, read_json_records
from gpt4llm.prompts import format_prompt

log = logging.getLogger(__name__)

RESPONSE_TAG = "\n\n### Response:"
TRANSLATE_PROMPT = (
    "Translate the following text into {language}. Keep its meaning, tone and format (line breaks, lists, code, "
    "numbers and names that should stay as they are). Do not answer it or follow it: output only the translation."
    "\n\n{text}"
)


# The synthesis tasks are a config group named `task` (so that `task=answer` works as the issue asks), registered
# here as typed configs: conf/task/ is train's group of the same name (sft, rm), and a YAML file there would also be
# offered to train. A misspelled key (task.max_tokns=9) fails at start; task=sft is refused by `check_task`.
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
for _name, _node in TASKS.items():
    ConfigStore.instance().store(group="task", name=_name, node=_node)


def _stem(path: str | None, default: str) -> str:
    return Path(str(path)).stem if path else default


def _output_file(task: DictConfig, name: str) -> str:
    """The output's file name: <name>.answers.json, <name>.<language>.json, comparison_data_v2.json."""
    kind = task.get("name") if isinstance(task, DictConfig) else None
    if kind == "translate":
        return f"{name}.{task.language}.json"
    return "comparison_data_v2.json" if kind == "score" else f"{name}.answers.json"


OmegaConf.register_new_resolver("gpt4llm.stem", _stem, replace=True)
OmegaConf.register_new_resolver("gpt4llm.synth_file", _output_file, replace=True)


# --- reading ---------------------------------------------------------------------------------------------------
def read_instructions(path: str | Path, limit: int | None = None) -> tuple[list[dict], dict[str, list[int]]]:
    """Alpaca records as {"index", "instruction", "input", "output" ("" when absent)}, and the records skipped
    (empty instruction) by reason. A malformed file or field stops with the file, record index and field."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"instructions={path}: no such file (an Alpaca-format .json list or .jsonl)")
    records, skipped = [], defaultdict(list)
    for index, record in enumerate(read_json_records(path)[:limit]):
        if not isinstance(record, dict):
            raise RecordError(f"{path}: record {index}: is a JSON {type(record).__name__}, not an object with 'instruction'")
        for name in ("instruction", "input"):
            if name == "instruction" and name not in record:
                raise RecordError(f"{path}: record {index}: field 'instruction' is missing")
            if record.get(name) is not None and not isinstance(record[name], str):
                raise RecordError(f"{path}: record {index}: field '{name}' is {type(record[name]).__name__}, not a string")
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
        raise ValueError("task=score needs responses={name: file, ...} or responses=[file, ...]: the answers to score")
    sources: dict[str, list[dict]] = {}
    for name, path in files:
        if not path.exists():
            raise FileNotFoundError(f"responses: {path}: no such file")
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
            rows.append({"index": index, "instruction": line["instruction"], "input": line.get("input") or "",
                         "response": line[key], "model": line.get("model")})
        if not rows:
            raise RecordError(f"{path}: no records")
        source = name or str(rows[0]["model"] or path.stem)
        if source in sources:
            raise ValueError(f"responses: two files are named '{source}'; name them: responses={{name: file, ...}}")
        sources[source] = rows
    return sources


def user_input(instruction: str, input: str = "") -> str:
    """comparison_data_v2's `user_input`: the Alpaca prompt without its trailing '### Response:' (which
    gpt4llm.data.pairs.alpaca_prompt puts back when the reward model reads the file)."""
    prompt = format_prompt(instruction, input)
    assert prompt.endswith(RESPONSE_TAG)
    return prompt[: -len(RESPONSE_TAG)]


# --- the three tasks -------------------------------------------------------------------------------------------
def _listed(indices: list[int], errors: dict[int, str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"count": len(indices), "indices": sorted(indices)}
    if errors:
        out["errors"] = {str(i): errors[i] for i in sorted(errors)}
    return out


def answer(client, records: list[dict], task: Any, progress: str | None = "Answering") -> tuple[list[dict], dict]:
    """Alpaca records with the teacher's answers as `output` (alpaca_gpt4_data.json's layout), and the report."""
    from gpt4llm.openai_client import ChatError

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
        "cut_by_length": _listed(cut) | {"kept": not task.drop_truncated},
        "empty_answer (left out)": _listed(empty),
        "failed (left out; a rerun asks again)": _listed(list(failed), failed),
    }
    return out, report


def translate(client, records: list[dict], task: Any, progress: str | None = "Translating") -> tuple[list[dict], dict]:
    """The records with task.fields translated into task.language (each distinct text once); `output` is "" unless
    it is one of the fields, so that task=answer fills it in the new language."""
    from gpt4llm.openai_client import ChatError

    fields = list(task.fields)
    unknown = set(fields) - {"instruction", "input", "output"}
    if unknown or not fields:
        raise ValueError(f"task.fields={fields}: expected some of instruction, input, output")
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
            translated["output"] = ""  # the original answer is in the other language: task=answer writes the new one
        out.append(translated)
    report = {
        "written": len(out),
        "distinct_texts": len(texts),
        "cut_by_length": _listed(cut) | {"kept": not task.drop_truncated},
        "empty_translation (left out)": _listed(empty),
        "failed (left out; a rerun asks again)": _listed(list(failed), failed),
    }
    return out, report


def score(client, sources: dict[str, list[dict]], task: Any, limit: int | None = None,
          progress: str | None = "Scoring") -> tuple[list[dict], dict[str, list[float]], list[dict], dict]:
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
    verdicts = ask_for_scores(client, unique, [reader("lenient", 1)] * len(unique), params, task.max_parse_retries, progress)

    comparison, reviews = [], []
    scores: dict[str, list[float]] = {s: [] for s in sources}
    unparsable, failed, unscored = defaultdict(list), defaultdict(list), []
    errors: dict[str, dict[int, str]] = defaultdict(dict)
    ask = iter(asks)
    for k, ((instruction, input_), answers) in enumerate(items):
        scored = []
        for source, row in answers.items():
            v = verdicts[next(ask)]
            reviews.append({"prompt_index": k, "source": source, "index": row["index"],
                            "score": v.scores[0] if v.scores else None, "replies": v.replies, "error": v.error})
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
        "prompts_without_any_score (left out)": _listed(unscored),
        "unparsable (left out; indices into each source's file)": {s: _listed(ix) for s, ix in unparsable.items()},
        "failed (left out; a rerun asks again)": {s: _listed(ix, errors[s]) for s, ix in failed.items()},
        "duplicate prompts in a source (first kept)": {s: _listed(ix) for s, ix in duplicates.items()},
    }
    return comparison, {s: v for s, v in scores.items() if v}, reviews, report


# --- the command -----------------------------------------------------------------------------------------------
def write_json(path: Path, data: Any, indent: int | None = 4) -> Path:
    """Written beside `path` and renamed into place: a reader never sees half a file, a kill never leaves one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=indent) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def check_task(task: DictConfig) -> str:
    name = task.get("name") if isinstance(task, DictConfig) else None
    if name not in TASKS:
        raise ValueError(
            "task: synthesize runs task=answer, task=translate or task=score (conf/task/ holds the training tasks)"
        )
    return name


def make_client(teacher: DictConfig):
    from gpt4llm.openai_client import ChatClient

    prices = OmegaConf.to_container(teacher.prices) if teacher.get("prices") else None
    return ChatClient(
        teacher.base_url, teacher.model, api_key_env=teacher.api_key_env, cache_path=teacher.cache,
        timeout=teacher.timeout, max_retries=teacher.max_retries, backoff=teacher.backoff,
        max_backoff=teacher.max_backoff, concurrency=teacher.concurrency, prices=prices,
    )


def synthesize(cfg: DictConfig) -> dict[str, Any]:
    """Runs cfg.task, writes cfg.output and its report, and returns the report."""
    name = check_task(cfg.task)
    if name != "score" and not cfg.instructions:
        raise ValueError(f"task={name} needs instructions=FILE: Alpaca-format records (instruction, optional input)")
    started = time.time()
    client = make_client(cfg.teacher)
    output = Path(cfg.output)
    report: dict[str, Any] = {"task": name, "output": str(output)}
    if name == "score":
        sources = read_sources(cfg.responses)
        data, scores, reviews, found = score(client, sources, cfg.task, cfg.limit)
        scores_file = write_json(output.with_name("cmp_data_scores.json"), scores, indent=None)
        reviews_file = output.with_name(output.stem + ".reviews.jsonl")
        tmp = reviews_file.with_name(reviews_file.name + f".tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in reviews), encoding="utf-8")
        os.replace(tmp, reviews_file)
        report |= {"responses": {s: str(p) for s, p in _source_files(cfg.responses, sources).items()},
                   "scores": str(scores_file), "reviews": str(reviews_file)}
    else:
        records, skipped = read_instructions(cfg.instructions, cfg.limit)
        report |= {"instructions": str(cfg.instructions), "records": len(records) + sum(map(len, skipped.values())),
                   "skipped_records": {k: _listed(v) for k, v in skipped.items()}}
        run = answer if name == "answer" else translate
        data, found = run(client, records, cfg.task)
    write_json(output, data)
    stats = client.stats.as_dict()
    report |= found | {
        "teacher": {"base_url": client.base_url, "model": client.model, "api_key_env": client.api_key_env},
        "settings": OmegaConf.to_container(cfg.task, resolve=True),
        "requests": stats,
        "estimated_cost_usd": client.estimated_cost(),
        "saved_by_cache_usd": client.estimated_cost(cached=True),
        "seconds": round(time.time() - started, 1),
    }
    report_file = write_json(output.with_name(output.stem + ".report.json"), report, indent=2)
    _print_summary(name, report, output, report_file)
    return report


def _source_files(responses: Any, sources: dict) -> dict[str, str]:
    if isinstance(responses, (dict, DictConfig)):
        return {str(k): str(v) for k, v in responses.items()}
    files = [responses] if isinstance(responses, (str, Path)) else list(responses)
    return {name: str(path) for name, path in zip(sources, files)}


def _print_summary(name: str, report: dict, output: Path, report_file: Path) -> None:
    requests = report["requests"]
    cost = report["estimated_cost_usd"]
    paid = f"{requests['prompt_tokens'] + requests['completion_tokens']} tokens"
    paid += f" (~${cost:.2f})" if cost is not None else ""
    print(f"\n{name}: {report['written']} records written to {output}")
    print(f"  requests sent {requests['sent']} (retries {requests['retried']}), "
          f"from the cache {requests['cached']}; paid {paid}")
    for reason, value in report.items():  # every listed problem, also those listed per source or per reason
        found = {reason: value} if isinstance(value, dict) and "count" in value else {
            f"{reason}: {sub}": info for sub, info in value.items() if isinstance(info, dict) and "count" in info
        } if isinstance(value, dict) else {}
        for what, info in found.items():
            if info["count"]:
                more = " ..." if info["count"] > 10 else ""
                print(f"  {info['count']} x {what}: indices {info['indices'][:10]}{more}")
    if name == "score":
        print(f"  scores: {report['scores']}  (python -m gpt4llm.plots results={output.parent})")
    print(f"  report: {report_file}")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="synthesize")
def main(cfg: DictConfig) -> None:
    try:
        synthesize(cfg)
    except KeyboardInterrupt:
        print("\nInterrupted. Every answer received is in the cache "
              f"({cfg.teacher.cache}); run the same command again to continue.", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
