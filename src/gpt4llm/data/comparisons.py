"""Comparison files for the reward model: three layouts, detected record by record, read into the same
(prompt, chosen, rejected) pairs:

  comparison_data_v2   {"user_input", "responses_and_scores": [{"response", "score", "source"}, ...]}
                       every two responses with different scores make a pair, the higher score preferred;
                       tied pairs are dropped and counted
  comparison_data (v1) {"user_input", "completion_a", "completion_b"}: completion_a preferred
  plain                {"prompt", "chosen", "rejected"}

The prompt is put in the Alpaca template unless it holds one already (data.formats).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from gpt4llm.data.conversations import RecordProblem, read_conversation
from gpt4llm.data.formats import FormatProblem, Unfit, prompt_format
from gpt4llm.data.prompts import PREAMBLES
from gpt4llm.data.records import Skip, unicode_problem
from gpt4llm.errors import RecordError
from gpt4llm.io.json_files import read_json_records

LAYOUTS = {  # name -> the fields that only this layout has (the first that matches)
    "comparison_data_v2": ("responses_and_scores",),
    "comparison_data_v1": ("completion_a", "completion_b"),
    "sharegpt_preference": ("conversations",),  # LLaMA-Factory's: conversations + chosen + rejected turns
    "plain": ("chosen", "rejected"),  # prompt: a string or a list of messages; chosen/rejected: strings or messages
}


class _Problem(ValueError):
    """A record that cannot be read as it is; becomes a RecordError (or a counted skip with skip_invalid)."""


def _layout(record: dict) -> str:
    for name, fields in LAYOUTS.items():
        if any(f in record for f in fields):
            return name
    raise _Problem(
        "is not a comparison record: expected 'responses_and_scores' (comparison_data_v2), "
        "'completion_a'/'completion_b' (v1), 'conversations'/'chosen'/'rejected' or 'prompt'/'chosen'/'rejected'"
    )


def _string(record: dict, name: str, where: str = "") -> str:
    label = f"{where}.{name}" if where else name
    if name not in record:
        raise _Problem(f"field '{label}' is missing")
    if not isinstance(record[name], str):
        raise _Problem(f"field '{label}' is {type(record[name]).__name__}, not a string")
    if problem := unicode_problem(record[name]):
        raise _Problem(f"field '{label}' {problem}")
    return record[name]


def _score(item: dict, where: str) -> float:
    if "score" not in item:
        raise _Problem(f"field '{where}.score' is missing")
    score = item["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise _Problem(f"field '{where}.score' is {score!r} ({type(score).__name__}), not a number")
    return float(score)


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    """A prompt given as a list of turns ({role, content} or ShareGPT's {from, value}) as messages."""
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise _Problem(f"field '{where}' is not a string or a list of turns")
    key = "conversations" if any("from" in t for t in value) else "messages"
    try:
        return read_conversation({key: value}).messages
    except RecordProblem as problem:
        raise _Problem(str(problem).replace(f"'{key}", f"'{where}")) from None


def _answer(record: dict, name: str) -> str:
    """A response given as a string, one turn ({from, value} / {role, content}), or a list whose last turn it is."""
    value = record.get(name)
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        turns = _messages(value, name)
        if not turns or turns[-1]["role"] != "assistant":
            raise _Problem(f"field '{name}' does not end with an assistant turn")
        return turns[-1]["content"]
    return _string(record, name)


def _ranked_responses(record: dict, layout: str) -> tuple[list[dict[str, str]], list[tuple[str, float]]]:
    """The prompt as messages and the (response, score) pairs of one record, higher score preferred; raises
    _Problem."""
    if layout in ("plain", "sharegpt_preference"):
        field = "conversations" if layout == "sharegpt_preference" else "prompt"
        prompt = record.get(field)
        messages = (
            [{"role": "user", "content": _string(record, field)}]
            if not isinstance(prompt, list)
            else (_messages(prompt, field))
        )
        return messages, [(_answer(record, "chosen"), 1.0), (_answer(record, "rejected"), 0.0)]
    prompt = [{"role": "user", "content": _string(record, "user_input")}]
    if layout == "comparison_data_v1":
        return prompt, [(_string(record, "completion_a"), 1.0), (_string(record, "completion_b"), 0.0)]
    items = record["responses_and_scores"]
    if not isinstance(items, list):
        raise _Problem(f"field 'responses_and_scores' is {type(items).__name__}, not a list")
    ranked = []
    for j, item in enumerate(items):
        where = f"responses_and_scores[{j}]"
        if not isinstance(item, dict):
            raise _Problem(f"field '{where}' is {type(item).__name__}, not an object with 'response' and 'score'")
        ranked.append((_string(item, "response", where), _score(item, where)))
    return prompt, ranked


def prompt_key(messages: list[dict[str, str]], template: str) -> str:
    """The prompt as the pairs carry it (data.formats: the Alpaca prompt, or the conversation as JSON for a chat
    template). A Skip when the paper's one-turn template cannot hold it, a _Problem for a malformed conversation."""
    try:
        return prompt_format(template).pair_prompt(messages)
    except Unfit as reason:
        raise Skip(str(reason)) from None
    except FormatProblem as problem:
        raise _Problem(str(problem)) from None


PAIRINGS = ("all", "best_vs_worst", "best_vs_rest")


def pairings(ranked: list[tuple[str, float]], pairing: str) -> list[tuple[int, int]]:
    """Which responses of one scored list are paired: every two ("all", the reward model's default), the best against
    the worst, or the best against each of the others. Ties are paired too, and then dropped and counted."""
    if pairing == "all" or len(ranked) < 2:
        return [(a, b) for a in range(len(ranked)) for b in range(a + 1, len(ranked))]
    order = sorted(range(len(ranked)), key=lambda k: -ranked[k][1])  # stable: equal scores keep file order
    best = order[0]
    others = order[-1:] if pairing == "best_vs_worst" else order[1:]
    return [tuple(sorted((best, k))) for k in others]


def read_comparison_pairs(
    path: str | Path, skip_invalid: bool = False, template: str = "alpaca", pairing: str = "all"
) -> tuple[list[dict], dict[str, Any]]:
    """Every (prompt, chosen, rejected) pair of a comparison file, each with its record's index, and what was dropped.

    Structural problems (not an object, a missing or non-string field, a missing or non-numeric score) stop with the
    file, record and field, unless `skip_invalid`; a record with fewer than two responses, tied scores, an empty (or
    whitespace-only) chosen or rejected response, identical responses and repeated pairs are always dropped and
    counted.
    """
    raw = read_json_records(path)
    layouts: Counter = Counter()
    skipped: dict[str, list[int]] = defaultdict(list)  # reason -> record indices
    dropped: dict[str, list[int]] = defaultdict(list)  # reason -> record index of each dropped pair
    templated = candidates = 0
    pairs, seen = [], set()
    for index, record in enumerate(raw):
        try:
            if not isinstance(record, dict):
                raise _Problem(f"is a JSON {type(record).__name__}, not an object")
            layout = _layout(record)
            messages, ranked = _ranked_responses(record, layout)
            raw_prompt = messages[-1]["content"] if messages else ""
            prompt = prompt_key(messages, template) if raw_prompt.strip() else ""
        except Skip as reason:
            skipped[str(reason)].append(index)
            continue
        except _Problem as problem:
            if not skip_invalid:
                raise RecordError(
                    f"{path}: record {index}: {problem} (set data.skip_invalid=true to skip such records)"
                ) from None
            skipped[str(problem)].append(index)
            continue
        layouts[layout] += 1
        if not raw_prompt.strip():
            skipped["empty prompt"].append(index)
            continue
        if len(ranked) < 2:
            skipped["fewer than two responses"].append(index)
            continue
        templated += raw_prompt.lstrip().startswith(PREAMBLES)
        for a, b in pairings(ranked, pairing):
            candidates += 1
            (text_a, score_a), (text_b, score_b) = ranked[a], ranked[b]
            chosen, rejected = (text_a, text_b) if score_a > score_b else (text_b, text_a)
            if score_a == score_b:
                dropped["tied scores"].append(index)
            elif not chosen.strip() or not rejected.strip():  # nothing to prefer or to avoid: not trained on
                dropped["empty response"].append(index)
            elif text_a == text_b:
                dropped["identical responses"].append(index)
            elif (prompt, chosen, rejected) in seen:
                dropped["duplicate pair"].append(index)
            else:
                seen.add((prompt, chosen, rejected))
                pairs.append({"index": index, "prompt": prompt, "chosen": chosen, "rejected": rejected})
    report = {
        "records": len(raw),
        "layouts": dict(layouts),
        "prompts_already_templated": templated,
        "candidate_pairs": candidates,
        "skipped_records": _counted(skipped),
        "dropped_pairs": _counted(dropped),
    }
    return pairs, report


def _counted(reasons: dict[str, list[int]]) -> dict[str, dict]:
    return {reason: {"count": len(ix), "first_indices": sorted(set(ix))[:10]} for reason, ix in reasons.items()}
