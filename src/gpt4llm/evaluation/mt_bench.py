"""MT-Bench (Zheng et al. 2023, FastChat's llm_judge): 80 two-turn questions in 8 categories, each turn of a model's
answers graded 1-10 by a judge, single-answer grading as FastChat's `gen_judgment.py --mode single` does it.

What is FastChat's, read as data (files pinned by commit and checksum in conf/metric/mt_bench.yaml):
- the questions (data/mt_bench/question.jsonl) and GPT-4's reference answers (reference_answer/gpt-4.jsonl);
- the judge prompts (data/judge_prompts.jsonl): single-v1 for turn 1, single-v1-multi-turn for turn 2, and the
  -math- variants with the reference answer for math, reasoning and coding (FastChat's NEED_REF_CATS);
- the judge request (`judge_messages`): the prompt's system message, then the template filled by str.format, as
  common.run_judge_single sends it to an OpenAI model (temperature 0, max_tokens 2048);
- the rating (`parse_rating`): the first "[[x]]", else the first "[x]", read by ast.literal_eval; none is FastChat's
  -1, which show_result drops: here it is counted as unparsable and never scored;
- the scores (`summarize`): show_result's means over the rated turns (turn 1, turn 2, both), and per category.
Checked against FastChat's own run_judge_single and the installed fschat package in tests/test_mt_bench.py.

Answers: ours ({"id", "model", "turns": [answer 1, answer 2]}, written by `evaluate metric=mt_bench model.path=...`)
or FastChat's ({"question_id", "model_id", "choices": [{"turns": [...]}]}).
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from gpt4llm.errors import RecordError
from gpt4llm.io.json_files import read_json_records

NEED_REF_CATS = ("math", "reasoning", "coding")  # FastChat common.NEED_REF_CATS (its arena-hard-200 is not here)
ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")  # common.one_score_pattern
ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")  # common.one_score_pattern_backup
PROMPT_NAMES = {  # gen_judgment.make_judge_single: (reference-based?, turn) -> judge prompt
    (False, 1): "single-v1",
    (True, 1): "single-math-v1",
    (False, 2): "single-v1-multi-turn",
    (True, 2): "single-math-v1-multi-turn",
}


def load_questions(path: str | Path) -> list[dict[str, Any]]:
    """question.jsonl: {"question_id", "category", "turns": [str, str]}; a line without them stops with its id."""
    questions = []
    for index, q in enumerate(read_json_records(Path(path))):
        where = f"{path}: line {index + 1}"
        for name, kind in (("question_id", (int, str)), ("category", str), ("turns", list)):
            if not isinstance(q, dict) or not isinstance(q.get(name), kind):
                raise RecordError(f"{where}: field '{name}' is missing or not a {kind}")
        if not q["turns"] or not all(isinstance(t, str) for t in q["turns"]):
            raise RecordError(f"{where}: question {q['question_id']}: 'turns' must be a list of strings")
        questions.append(q)
    return questions


def load_judge_prompts(path: str | Path) -> dict[str, dict]:
    """judge_prompts.jsonl by name; the four single-answer prompts must be there."""
    prompts = {p["name"]: p for p in read_json_records(Path(path)) if isinstance(p, dict) and "name" in p}
    for name in PROMPT_NAMES.values():
        if name not in prompts:
            raise RecordError(f"{path}: no judge prompt named {name!r} (FastChat's judge_prompts.jsonl has it)")
        for field in ("system_prompt", "prompt_template", "output_format"):
            if field not in prompts[name]:
                raise RecordError(f"{path}: judge prompt {name!r}: field '{field}' is missing")
    return prompts


def load_reference_answers(path: str | Path) -> dict[str, list[str]]:
    """reference_answer/gpt-4.jsonl: question id -> the reference's turns."""
    out = {}
    for index, line in enumerate(read_json_records(Path(path))):
        try:
            out[str(line["question_id"])] = list(line["choices"][0]["turns"])
        except (KeyError, IndexError, TypeError):
            raise RecordError(f"{path}: line {index + 1}: expected question_id and choices[0].turns") from None
    return out


def read_answers(path: str | Path, questions: list[dict]) -> tuple[str, dict[str, list[str]]]:
    """(model name, question id -> the model's answers, one per turn) from our layout or FastChat's. Every question
    must be answered in every turn: the first question missing, unknown or short of a turn stops with its id."""
    by_id: dict[str, list[str]] = {}
    name = None
    for index, line in enumerate(read_json_records(Path(path))):
        where = f"{path}: line {index + 1}"
        if not isinstance(line, dict):
            raise RecordError(f"{where}: not a JSON object")
        if "choices" in line:  # FastChat's answer file
            qid, turns, name = line.get("question_id"), (line["choices"] or [{}])[0].get("turns"), line.get("model_id")
        else:
            qid, turns, name = line.get("id"), line.get("turns"), line.get("model")
        if qid is None or not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise RecordError(f"{where}: expected 'id' and 'turns' (the answers), or FastChat's question_id/choices")
        by_id[str(qid)] = turns
    known = {str(q["question_id"]): q for q in questions}
    for qid in by_id:
        if qid not in known:
            raise RecordError(f"{path}: question id {qid} is not an MT-Bench question (answers of another set?)")
    for qid, q in known.items():
        if qid not in by_id:
            raise RecordError(f"{path}: question {qid} has no answer")
        if len(by_id[qid]) < len(q["turns"]):
            raise RecordError(f"{path}: question {qid}: {len(by_id[qid])} answers for {len(q['turns'])} turns")
    return str(name or Path(path).parent.name), by_id


def judge_messages(
    prompt: dict, question: dict, answers: list[str], turn: int, reference: list[str] | None = None
) -> list[dict]:
    """The request FastChat's run_judge_single sends for `turn` (1 or 2) of one answer."""
    kwargs = {}
    if reference is not None:
        kwargs["ref_answer_1"] = reference[0]
        if turn == 2:
            kwargs["ref_answer_2"] = reference[1]
    if turn == 2:
        user = prompt["prompt_template"].format(
            question_1=question["turns"][0],
            question_2=question["turns"][1],
            answer_1=answers[0],
            answer_2=answers[1],
            **kwargs,
        )
    else:
        user = prompt["prompt_template"].format(question=question["turns"][0], answer=answers[0], **kwargs)
    return [{"role": "system", "content": prompt["system_prompt"]}, {"role": "user", "content": user}]


def judge_requests(
    questions: list[dict], answers: dict[str, list[str]], prompts: dict[str, dict], references: dict[str, list[str]]
) -> list[dict]:
    """One request per question and turn: {"question_id", "category", "turn", "prompt", "messages"}."""
    requests = []
    for q in questions:
        qid = str(q["question_id"])
        ref_based = q["category"] in NEED_REF_CATS
        if ref_based and qid not in references:
            raise RecordError(
                f"question {qid} ({q['category']}) needs a reference answer and metric.files.reference_answers has "
                "none for it (FastChat's reference_answer/gpt-4.jsonl has one for every math, reasoning, coding one)"
            )
        for turn in range(1, min(2, len(q["turns"])) + 1):
            name = PROMPT_NAMES[(ref_based, turn)]
            messages = judge_messages(prompts[name], q, answers[qid], turn, references.get(qid) if ref_based else None)
            requests.append(
                {"question_id": q["question_id"], "category": q["category"], "turn": turn, "prompt": name}
                | {"messages": messages}
            )
    return requests


def parse_rating(judgment: str) -> float | None:
    """FastChat's rating: "[[x]]", else "[x]", the first match; None where FastChat writes -1."""
    match = ONE_SCORE.search(judgment) or ONE_SCORE_BACKUP.search(judgment)
    return ast.literal_eval(match.groups()[0]) if match else None


def summarize(judgments: list[dict], model: str) -> dict[str, Any]:
    """show_result --mode single for one model: the mean score of turn 1, turn 2 and all rated turns, and per
    category (both turns); unparsable and failed judgments counted, never scored."""

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    rated = [j for j in judgments if j.get("score") is not None]
    per_category: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for j in rated:
        per_category[j["category"]][j["turn"]].append(j["score"])
    return {
        "model": model,
        "score": mean([j["score"] for j in rated]),
        "turn_1": mean([j["score"] for j in rated if j["turn"] == 1]),
        "turn_2": mean([j["score"] for j in rated if j["turn"] == 2]),
        "per_category": {
            c: {"score": mean(t[1] + t[2]), "turn_1": mean(t[1]), "turn_2": mean(t[2])}
            for c, t in sorted(per_category.items())
        },
        "judgments": len(judgments),
        "rated": len(rated),
        "unparsable": [
            f"{j['question_id']}/turn {j['turn']}" for j in judgments if j.get("score") is None and not j.get("error")
        ],
        "failed": [f"{j['question_id']}/turn {j['turn']}" for j in judgments if j.get("error")],
    }


def radar_plot(summaries: list[dict], path: str | Path) -> Path:
    """The per-category radar plot of the MT-Bench paper and leaderboard, one polygon per model (scores 0-10)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    categories = sorted({c for s in summaries for c in s["per_category"]})
    angles = np.linspace(0, 2 * np.pi, len(categories), endpoint=False).tolist()
    fig, ax = plt.subplots(figsize=(6, 6), subplot_kw={"polar": True})
    for s in summaries:
        values = [s["per_category"].get(c, {}).get("score") or 0.0 for c in categories]
        ax.plot(angles + angles[:1], values + values[:1], label=f"{s['model']} ({s['score'] or 0:.2f})")
        ax.fill(angles + angles[:1], values + values[:1], alpha=0.1)
    ax.set_xticks(angles, categories)
    ax.set_ylim(0, 10)
    ax.set_title("MT-Bench score per category")
    ax.legend(loc="upper right", bbox_to_anchor=(1.3, 1.1), fontsize=8)
    path = Path(path)
    fig.savefig(path, bbox_inches="tight", dpi=120)
    plt.close(fig)
    return path
