"""What the judge benchmarks (MT-Bench, AlpacaEval 2, Arena-Hard) share around the judge's calls: the cost
estimated and shown before the first request (asked for above `max_cost`), the calls through the project's client
(cached on disk reply by reply, so a run killed mid-judging asks again only what it had not got), and the scores
written for TensorBoard.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from gpt4llm.errors import ConfigError
from gpt4llm.inference.openai_client import ChatClient, ChatError, ChatResult

CHARS_PER_TOKEN = 4  # OpenAI's rule of thumb for English; the estimate is for deciding, the bill comes from usage


def estimate_cost(client: ChatClient, requests: list[dict], params: dict, completion_tokens: int) -> dict[str, Any]:
    """What the requests not yet in the cache will cost: prompt tokens from their characters, `completion_tokens`
    per reply (the benchmark's typical judgment), priced by the client's `prices` (None: unknown)."""
    todo = [
        r
        for r in requests
        if client.cache is None or client.cache.get(client.cache_key(r["messages"], params, 0)) is None
    ]
    prompt = sum(len(json.dumps(r["messages"], ensure_ascii=False)) for r in todo) // CHARS_PER_TOKEN
    completion = completion_tokens * len(todo)
    usd = None
    if client.prices:
        usd = (prompt * client.prices.get("prompt", 0.0) + completion * client.prices.get("completion", 0.0)) / 1000
    return {
        "requests": len(requests),
        "cached": len(requests) - len(todo),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "usd": usd,
    }


def confirm_cost(estimate: dict, max_cost: float | None, what: str) -> None:
    """Prints the estimate; above `max_cost` US$ asks on a terminal and stops elsewhere (nothing sent yet)."""
    usd = "unknown (set metric.prices to see it)" if estimate["usd"] is None else f"about ${estimate['usd']:.2f}"
    print(
        f"{what}: {estimate['requests']} judge requests, {estimate['cached']} already answered in the cache; "
        f"to send: ~{estimate['prompt_tokens']:,} prompt + ~{estimate['completion_tokens']:,} completion tokens, "
        f"cost {usd}"
    )
    if max_cost is None or estimate["usd"] is None or estimate["usd"] <= max_cost:
        return
    if sys.stdin.isatty():
        if input(f"That is above metric.max_cost=${max_cost:g}. Send them? [y/N] ").strip().lower() in ("y", "yes"):
            return
    raise ConfigError(
        f"{what}: the estimated cost ${estimate['usd']:.2f} is above metric.max_cost=${max_cost:g}; raise "
        "metric.max_cost (or set it to null) to run it"
    )


def ask_judge(client: ChatClient, requests: list[dict], params: dict, desc: str) -> list[ChatResult | ChatError]:
    """One reply per request (sample 0, so a rerun reads it back from the cache instead of paying again)."""
    return client.chat_many([{"messages": r["messages"], "sample": 0, **params} for r in requests], desc)


def write_scalars(out: Path, scalars: dict[str, float | None]) -> Path:
    """The scores as TensorBoard scalars (step 0) under `out`/tensorboard."""
    from torch.utils.tensorboard import SummaryWriter

    directory = out / "tensorboard"
    writer = SummaryWriter(str(directory))
    for tag, value in scalars.items():
        if value is not None:
            writer.add_scalar(tag, float(value), 0)
    writer.close()
    return directory


def read_benchmark_answers(path: str | Path, ids: list[str], benchmark: str) -> tuple[str, dict[str, str]]:
    """(model name, id -> answer) for a one-turn benchmark, from our responses file ({"id", "response", "model"}) or
    the benchmark's own answer layout ({"question_id", "model_id", "choices": [{"turns": [{"content"}]}]}, Arena-Hard
    and FastChat). Every id answered once, no other: the first unknown or missing id stops with its name."""
    from gpt4llm.errors import RecordError
    from gpt4llm.io.json_files import read_json_records

    answers: dict[str, str] = {}
    name = None
    for index, line in enumerate(read_json_records(Path(path))):
        where = f"{path}: line {index + 1}"
        try:
            if "choices" in line:
                turn = line["choices"][0]["turns"][0]
                qid, text, name = (
                    line["question_id"],
                    turn["content"] if isinstance(turn, dict) else turn,
                    line.get("model_id"),
                )
            else:
                qid, text, name = line["id"], line["response"], line.get("model")
        except (KeyError, IndexError, TypeError):
            raise RecordError(
                f"{where}: expected 'id' and 'response' (gpt4llm.generate) or question_id and choices[0].turns[0]"
            ) from None
        if not isinstance(text, str):
            raise RecordError(f"{where}: the answer is {type(text).__name__}, not a string")
        if str(qid) in answers:
            raise RecordError(f"{where}: id {qid} answered twice")
        answers[str(qid)] = text
    known = set(ids)
    for qid in answers:
        if qid not in known:
            raise RecordError(f"{path}: id {qid} is not a {benchmark} question (answers of another set?)")
    for qid in ids:
        if qid not in answers:
            raise RecordError(f"{path}: {benchmark} question {qid} has no answer")
    return str(name or Path(path).parent.name), answers


def say_failures(replies: list, what: str) -> None:
    """How many requests failed after the client's retries, and the first one's reason (an HTTP 401 or 400 is not
    cured by running again: the reason says what is)."""
    failed = [r for r in replies if isinstance(r, ChatError)]
    if failed:
        print(f"{what}: {len(failed)} of {len(replies)} requests failed; the first: {str(failed[0])[:300]}")
