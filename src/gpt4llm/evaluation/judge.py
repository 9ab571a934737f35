"""GPT-4 as judge: the paper's relative score of a model against an opponent (ChatGPT, GPT-4, ...).

Two ways to get the scores, both 1-10 per answer:
- pairwise: FastChat's Vicuna review, both answers in one prompt (the model as Assistant 1), the reply's first line
  holding the two scores; this is how the paper scored Vicuna-80 (section 3(b) of docs/paper_spec.md);
- single: the paper's scoring prompt (GPT-4-LLM issue #8), each answer judged on its own, one score per reply.

Relative score = sum of the model's scores / sum of the opponent's x 100, per category and overall, over the
questions where both scores exist. A reply without parsable scores (e.g. "N/A") is asked for again, as a new sample,
up to `max_parse_retries` times, then counted and listed; so is a request that failed after the client's retries.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from gpt4llm.evaluation import judge_prompts as P
from gpt4llm.openai_client import ChatClient, ChatError


def parse_scores(reply: str, count: int) -> list[float] | None:
    """The `count` scores on the reply's first non-empty line, or None. "8 7", "8, 7", "Assistant 1: 8 Assistant 2: 7",
    "8/10" and "Score: 8.5" parse; "N/A", a missing or extra number, or a score outside 0-10 do not."""
    first = next((line for line in reply.splitlines() if line.strip()), "")
    first = re.sub(r"assistant\s*[12]", " ", first, flags=re.IGNORECASE)
    first = re.sub(r"(\d)\s*/\s*10\b", r"\1", first)  # "8/10" is one score
    numbers = [float(x) for x in re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])", first)]
    if len(numbers) != count or not all(0 <= x <= 10 for x in numbers):
        return None
    return numbers


def question_text(record: dict) -> str:
    """What the judge sees as the question: the instruction, and the input below it when there is one."""
    return record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")


def pairwise_messages(question: str, answer_1: str, answer_2: str, category: str | None) -> list[dict]:
    prompt = P.REVIEW_PROMPTS[P.CATEGORY_PROMPT.get(category or "", "general")]
    user = P.PAIRWISE_TEMPLATE.format(question=question, answer_1=answer_1, answer_2=answer_2, prompt=prompt)
    return [{"role": "system", "content": P.PAIRWISE_SYSTEM}, {"role": "user", "content": user}]


def single_messages(question: str, answer: str) -> list[dict]:
    user = P.SINGLE_TEMPLATE.format(instruction=question, response=answer)
    return ([{"role": "system", "content": P.SINGLE_SYSTEM}] if P.SINGLE_SYSTEM else []) + [{"role": "user", "content": user}]


@dataclass
class Verdict:
    scores: list[float] | None = None
    replies: list[str] = field(default_factory=list)
    error: str | None = None


def ask_for_scores(
    client: ChatClient, conversations: list[list[dict]], count: int, params: dict, max_parse_retries: int, desc: str
) -> list[Verdict]:
    """Each conversation sent until its reply parses, at most 1 + max_parse_retries times. Retry k is sample k of the
    same request, so the cache keeps every reply and a rerun pays for none of them again."""
    verdicts = [Verdict() for _ in conversations]
    pending = list(range(len(conversations)))
    for attempt in range(max_parse_retries + 1):
        if not pending:
            break
        label = desc if attempt == 0 else f"{desc} (retry {attempt}: {len(pending)} unparsable)"
        results = client.chat_many([{"messages": conversations[i], "sample": attempt, **params} for i in pending], label)
        still = []
        for i, result in zip(pending, results):
            if isinstance(result, ChatError):
                verdicts[i].error = str(result)  # the client already retried; a rerun asks again
                continue
            verdicts[i].replies.append(result.text)
            verdicts[i].scores = parse_scores(result.text, count)
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
) -> tuple[list[dict], dict[str, Any]]:
    """Reviews (one dict per question) and the summary (relative scores, problems, request counts).

    `answers`/`opponent`: from `read_responses`. `questions` (id -> eval record) supplies the question text and
    category when the answer files do not carry them (FastChat's answer files do not).
    """
    if mode not in ("pairwise", "single"):
        raise ValueError(f"metric.mode={mode!r}: expected pairwise or single")
    if mode == "pairwise" and opponent is None:
        raise ValueError("metric.mode=pairwise needs metric.opponent: the answers to compare against")
    params = params or {}
    before = client.stats.as_dict()  # the client may have served other models' reviews already
    theirs = {str(a["id"]): a for a in opponent or []}
    problems: dict[str, list] = defaultdict(list)
    items = []
    for a in answers:
        qid = str(a["id"])
        record = (questions or {}).get(qid) or a
        if "instruction" not in record:
            raise ValueError(f"id {a['id']}: no question text (pass eval=<the eval set> so the judge can see the question)")
        other = theirs.get(qid)
        if opponent is not None and other is None:
            problems["no opponent answer (left out)"].append(a["id"])
            continue
        if not a["response"].strip():
            problems["empty response (judged as it is)"].append(a["id"])
        items.append((a, record, other))

    if mode == "pairwise":
        conversations = [pairwise_messages(question_text(r), a["response"], o["response"], r.get("category")) for a, r, o in items]
        verdicts = ask_for_scores(client, conversations, 2, params, max_parse_retries, "Judging pairs")
        pairs = [(v, None) for v in verdicts]  # one reply holds both scores
    else:
        mine = ask_for_scores(client, [single_messages(question_text(r), a["response"]) for a, r, _ in items], 1, params,
                              max_parse_retries, "Judging answers")
        if opponent is not None:
            others = ask_for_scores(client, [single_messages(question_text(r), o["response"]) for _, r, o in items], 1,
                                    params, max_parse_retries, "Judging opponent answers")
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
        reviews.append({
            "id": a["id"], "category": record.get("category"), "status": status, "scores": scores,
            "replies": [v.replies for v in verdicts], "errors": [v.error for v in verdicts if v.error],
        })
    summary = summarize(reviews, answers[0]["model"], opponent[0]["model"] if opponent else None)
    summary |= {
        "mode": mode,
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
    return {"model": model, "opponent": opponent, **overall, "per_category": {c: block(s) for c, s in sorted(groups.items())}}
