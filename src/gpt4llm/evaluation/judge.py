"""GPT-4 as judge: the paper's relative score of a model against an opponent (ChatGPT, GPT-4, ...).

Two ways to get the scores, both 1-10 per answer:
- pairwise: FastChat's Vicuna review, both answers in one prompt (the model as Assistant 1), with FastChat's own
  prompt and reviewer files (judge_prompts.FastChatReviewers); how the paper scored Vicuna-80 (docs/paper_spec.md 3(b));
- single: the paper's scoring prompt (GPT-4-LLM issue #8), each answer judged on its own, one score per reply.

How a reply becomes scores is the score rule:
- fastchat (default): FastChat's `parse_score` exactly: the first line, commas made spaces, split on single spaces,
  exactly the expected count of numbers; anything else is unparsable (FastChat's -1/-1) and is not asked again.
  FastChat's math prompt asks for the scores as a Python tuple at the end, which that rule never reads: FastChat's
  users fixed those pairs by hand from the tuple, so the last "(x, y)" of such a reply is read, and counted apart.
- lenient: our forgiving reader ("Assistant 1: 8", "8/10", blank first lines), and an unparsable reply asked again,
  as a new sample, up to `max_parse_retries` times.
Every summary says which rule read the scores and how many replies it could not read.

Relative score = sum of the model's scores / sum of the opponent's x 100, per category and overall, over the
questions where both scores exist; unparsable replies and failed requests are counted and listed, never scored.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gpt4llm.errors import ConfigError
from gpt4llm.evaluation import judge_prompts as P
from gpt4llm.evaluation.judge_prompts import FastChatReviewers
from gpt4llm.inference.openai_client import ChatClient, ChatError

SCORE_RULES = ("fastchat", "lenient")
MATH_TUPLE = re.compile(r"\(\s*(\d+(?:\.\d+)?)\s*,\s*(\d+(?:\.\d+)?)\s*\)")


def fastchat_scores(reply: str, count: int = 2) -> list[float] | None:
    """FastChat's parse_score (fastchat/eval/eval_gpt_review.py at 6d987107), with None for its [-1, -1]."""
    fields = reply.split("\n")[0].replace(",", " ").split(" ")
    if len(fields) != count:
        return None
    try:
        return [float(x) for x in fields]
    except ValueError:
        return None


def math_tuple_scores(reply: str) -> list[float] | None:
    """The last "(x, y)" of a reply: where FastChat's math prompt asks for the scores."""
    found = MATH_TUPLE.findall(reply)
    return [float(x) for x in found[-1]] if found else None


def parse_scores(reply: str, count: int) -> list[float] | None:
    """The lenient rule: the `count` scores on the reply's first non-empty line, or None. "8 7", "8, 7",
    "Assistant 1: 8 Assistant 2: 7", "8/10" and "Score: 8.5" parse; "N/A", a missing or extra number, or a score
    outside 0-10 do not."""
    first = next((line for line in reply.splitlines() if line.strip()), "")
    first = re.sub(r"assistant\s*[12]", " ", first, flags=re.IGNORECASE)
    first = re.sub(r"(\d)\s*/\s*10\b", r"\1", first)  # "8/10" is one score
    numbers = [float(x) for x in re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])", first)]
    if len(numbers) != count or not all(0 <= x <= 10 for x in numbers):
        return None
    return numbers


def reader(rule: str, count: int, math_tuple: bool = False) -> Callable[[str], tuple[list[float] | None, str | None]]:
    """reply -> (scores, how they were read: "first line" / "math tuple"), under `rule`."""
    if rule not in SCORE_RULES:
        raise ConfigError(f"metric.score_rule={rule!r}: expected one of {', '.join(SCORE_RULES)}")

    def read(reply: str) -> tuple[list[float] | None, str | None]:
        scores = fastchat_scores(reply, count) if rule == "fastchat" else parse_scores(reply, count)
        if scores is not None:
            return scores, "first line"
        if rule == "fastchat" and math_tuple and (scores := math_tuple_scores(reply)) is not None:
            return scores, "math tuple"
        return None, None

    return read


def question_text(record: dict) -> str:
    """What the judge sees as the question: the instruction, and the input below it when there is one."""
    return record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")


def single_messages(question: str, answer: str) -> list[dict]:
    user = P.SINGLE_TEMPLATE.format(instruction=question, response=answer)
    return ([{"role": "system", "content": P.SINGLE_SYSTEM}] if P.SINGLE_SYSTEM else []) + [
        {"role": "user", "content": user}
    ]


@dataclass
class Verdict:
    scores: list[float] | None = None
    replies: list[str] = field(default_factory=list)
    error: str | None = None
    read_by: str | None = None  # "first line" or "math tuple"


def ask_for_scores(
    client: ChatClient,
    conversations: list[list[dict]],
    readers: list[Callable],
    params: dict,
    max_parse_retries: int,
    desc: str,
) -> list[Verdict]:
    """Each conversation sent until `readers[i]` reads its reply, at most 1 + max_parse_retries times. Retry k is
    sample k of the same request, so the cache keeps every reply and a rerun pays for none of them again."""
    verdicts = [Verdict() for _ in conversations]
    pending = list(range(len(conversations)))
    for attempt in range(max_parse_retries + 1):
        if not pending:
            break
        label = desc if attempt == 0 else f"{desc} (retry {attempt}: {len(pending)} unparsable)"
        results = client.chat_many(
            [{"messages": conversations[i], "sample": attempt, **params} for i in pending], label
        )
        still = []
        for i, result in zip(pending, results):
            if isinstance(result, ChatError):
                verdicts[i].error = str(result)  # the client already retried; a rerun asks again
                continue
            verdicts[i].replies.append(result.text)
            verdicts[i].scores, verdicts[i].read_by = readers[i](result.text)
            if verdicts[i].scores is None:
                still.append(i)
        pending = still
    return verdicts


def judge(
    client: ChatClient,
    answers: list[dict],
    opponent: list[dict] | None,
    mode: str = "pairwise",
    params: dict | None = None,
    max_parse_retries: int = 2,
    questions: dict[str, dict] | None = None,
    reviewers: FastChatReviewers | None = None,
    score_rule: str = "fastchat",
) -> tuple[list[dict], dict[str, Any]]:
    """Reviews (one dict per question) and the summary (relative scores, problems, request counts).

    `answers`/`opponent`: from `read_responses`. `questions` (id -> eval record) supplies the question text and
    category when the answer files do not carry them (FastChat's answer files do not). `reviewers`: FastChat's
    prompt and reviewer files, which pairwise mode needs. Under the fastchat rule nothing is asked twice.
    """
    if mode not in ("pairwise", "single"):
        raise ConfigError(f"metric.mode={mode!r}: expected pairwise or single")
    if mode == "pairwise" and opponent is None:
        raise ConfigError("metric.mode=pairwise needs metric.opponent: the answers to compare against")
    if mode == "pairwise" and reviewers is None:
        raise ConfigError("metric.mode=pairwise needs FastChat's prompt and reviewer files (metric.fastchat)")
    retries = max_parse_retries if score_rule == "lenient" else 0
    params = params or {}
    before = client.stats.as_dict()  # the client may have served other models' reviews already
    theirs = {str(a["id"]): a for a in opponent or []}
    problems: dict[str, list] = defaultdict(list)
    items = []
    for a in answers:
        qid = str(a["id"])
        record = (questions or {}).get(qid) or a
        if "instruction" not in record:
            raise ConfigError(
                f"id {a['id']}: no question text (pass eval=<the eval set> so the judge can see the question)"
            )
        other = theirs.get(qid)
        if opponent is not None and other is None:
            problems["no opponent answer (left out)"].append(a["id"])
            continue
        if not a["response"].strip():
            problems["empty response (judged as it is)"].append(a["id"])
        items.append((a, record, other))

    if mode == "pairwise":
        conversations = [
            reviewers.messages(r.get("category"), question_text(r), a["response"], o["response"]) for a, r, o in items
        ]
        readers = [reader(score_rule, 2, reviewers.asks_for_tuple(r.get("category"))) for _, r, _ in items]
        verdicts = ask_for_scores(client, conversations, readers, params, retries, "Judging pairs")
        pairs = [(v, None) for v in verdicts]  # one reply holds both scores
    else:
        one = [reader(score_rule, 1)] * len(items)
        mine = ask_for_scores(
            client,
            [single_messages(question_text(r), a["response"]) for a, r, _ in items],
            one,
            params,
            retries,
            "Judging answers",
        )
        if opponent is not None:
            others = ask_for_scores(
                client,
                [single_messages(question_text(r), o["response"]) for _, r, o in items],
                one,
                params,
                retries,
                "Judging opponent answers",
            )
        else:
            others = [None] * len(items)
        pairs = list(zip(mine, others))

    reviews = []
    for (a, record, _), (v_model, v_other) in zip(items, pairs):
        verdicts = [v for v in (v_model, v_other) if v is not None]
        scores = None if any(v.scores is None for v in verdicts) else [x for v in verdicts for x in v.scores]
        if any(v.error for v in verdicts):
            status = "request failed"
        elif scores is None:
            status = "unparsable"
        else:
            status = "ok"
        if status != "ok":
            problems[f"{status} (left out)"].append(a["id"])
        reviews.append(
            {
                "id": a["id"],
                "category": record.get("category"),
                "status": status,
                "scores": scores,
                "read_by": [v.read_by for v in verdicts],
                "replies": [v.replies for v in verdicts],
                "errors": [v.error for v in verdicts if v.error],
            }
        )
    summary = summarize(reviews, answers[0]["model"], opponent[0]["model"] if opponent else None)
    read_by = [v for r in reviews for v in r["read_by"]]
    summary |= {
        "mode": mode,
        "score_rule": score_rule,
        "replies_read": {how: read_by.count(how) for how in ("first line", "math tuple")},
        "replies_unparsable": sum(r["status"] == "unparsable" for r in reviews),
        "questions": len(answers),
        "problems": {reason: {"count": len(ids), "ids": ids} for reason, ids in problems.items()},
        "requests": {k: v - before[k] for k, v in client.stats.as_dict().items()},
    }
    return reviews, summary


def summarize(reviews: list[dict], model: str, opponent: str | None) -> dict[str, Any]:
    """Totals `[model, opponent]` (the plots notebook's layout) and relative score, overall and per category."""
    groups: dict[str, list[list[float]]] = defaultdict(list)
    for r in reviews:
        if r["status"] == "ok":
            groups["ALL"].append(r["scores"])
            groups[r["category"] or "none"].append(r["scores"])

    def block(scores: list[list[float]]) -> dict[str, Any]:
        mine = sum(s[0] for s in scores)
        out: dict[str, Any] = {"scored": len(scores), "mean": mine / len(scores) if scores else None}
        if opponent is not None:
            theirs = sum(s[1] for s in scores)
            out |= {"totals": [mine, theirs], "relative": 100 * mine / theirs if theirs else None}
        return out

    overall = block(groups.pop("ALL", []))
    return {
        "model": model,
        "opponent": opponent,
        **overall,
        "per_category": {c: block(s) for c, s in sorted(groups.items())},
    }
