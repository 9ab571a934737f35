"""The reward-model demo: the SFT demo's tasks as comparisons, so reward modelling runs offline on CPU.

Each demo record (gpt4llm.data.demo) becomes one pair in the plain layout: chosen = its exact answer, rejected = a
wrong answer of one of four kinds, taken in turn from KIND_CYCLE:
  off_topic  the answer to a prompt of another task,
  truncated  the answer with its last item (or, for a one-item answer, its last character) cut off,
  run_on     the answer followed by one more item, as a model that does not stop where the answer ends,
  other      the answer to another prompt of the same task: right form, wrong content.
None of them is wrong on its own: whether a response is cut short, runs on or answers the question depends on the
prompt. `other` comes once in eight: for counting and comparing tasks it takes more than a tiny model learns from
scratch in a few minutes (see the reward-model note for accuracy by kind).
The prompt is written already templated, as in GPT-4-LLM's comparison files. Deterministic by seed.
"""

from __future__ import annotations

import random
from pathlib import Path

from gpt4llm.data.demo import TASKS, make_demo_records
from gpt4llm.data.prompts import format_prompt
from gpt4llm.errors import ConfigError
from gpt4llm.io import json_files

KINDS = ("off_topic", "truncated", "run_on", "other")
KIND_CYCLE = ("truncated", "run_on", "off_topic", "other", "truncated", "run_on", "off_topic", "off_topic")
SEPARATORS = (", ", "、", " ")  # how the demo's list answers join their items


def _split(answer: str) -> tuple[str, list[str]]:
    for sep in SEPARATORS:
        if sep in answer:
            return sep, answer.split(sep)
    return " ", [answer]


def _wrong_answer(kind: str, prompt: str, answer: str, same_task: str, other_task: str) -> str | None:
    """A wrong answer of `kind`, or None where that kind does not apply."""
    if kind == "other":  # only where the answer is copied from the prompt and this one is not: the error is visible
        copied = all(item in prompt for item in _split(answer)[1])
        return same_task if copied and not all(item in prompt for item in _split(same_task)[1]) else None
    if kind == "off_topic":
        return other_task
    sep, items = _split(answer)
    if kind == "truncated":
        return sep.join(items[:-1]) if len(items) > 1 else answer[:-1] or None
    return answer + sep + _split(same_task)[1][0]  # run_on: does not stop where the answer ends


def make_demo_pairs(num_records: int, seed: int = 0) -> list[dict[str, str]]:
    """One pair per demo record (`prompt`, `chosen`, `rejected`, and `kind`, which the reader ignores)."""
    records = make_demo_records(num_records, seed)
    rng = random.Random(seed + 1)
    by_task = [records[t :: len(TASKS)] for t in range(len(TASKS))]  # make_demo_records cycles through TASKS
    pairs = []
    for i, record in enumerate(records):
        task, answer, prompt = i % len(TASKS), record["output"], format_prompt(record["instruction"], record["input"])
        same_task = [r["output"] for r in by_task[task] if r["output"] != answer]
        other_task = rng.choice(by_task[rng.choice([t for t in range(len(TASKS)) if t != task])])["output"]
        for kind in (KIND_CYCLE[i % len(KIND_CYCLE)], *KINDS):  # in turn; where one cannot apply, the first that can
            rejected = _wrong_answer(kind, prompt, answer, rng.choice(same_task), other_task) if same_task else None
            if rejected is not None and rejected != answer:
                break
        else:
            raise ConfigError(f"demo pairs: no wrong answer for record {i} ({record}); ask for more records")
        pairs.append({"prompt": prompt, "chosen": answer, "rejected": rejected, "kind": kind})
    return pairs


def write_demo_pairs_file(path: str | Path, num_records: int = 4000, seed: int = 0) -> Path:
    """Writes the demo pairs as a JSON list (atomically: a reader never sees half a file)."""
    return json_files.write_json(path, make_demo_pairs(num_records, seed), indent=1)
