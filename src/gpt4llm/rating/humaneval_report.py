"""Un-blinding a study's votes into the paper's Figure 3 numbers: per pair of models and criterion, the fractions of
votes where the model wins, loses (the opponent wins) or ties, with bootstrap confidence intervals and the raters'
agreement.

- A vote counts once per rater and task: the rater's latest (a rater who went back and changed a vote counts once).
- Confidence intervals resample tasks, not votes (scipy.stats.bootstrap, percentile, paired): two raters' votes on
  one item are not independent, so resampling votes would make the interval too narrow.
- Agreement: Fleiss' kappa (statsmodels) on the tasks with at least two raters, each task taken with the same number
  of votes (its first m, m the smallest count among them, as Fleiss' kappa needs), and Cohen's kappa for each pair of
  raters on the tasks both rated.

The JSON (`humaneval_report.json`) is what `python -m gpt4llm.plots` reads for the pies and bars.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from typing import Any

import numpy as np

from gpt4llm.rating.store import VoteStore
from gpt4llm.rating.study import Study

REPORT_FILE = "humaneval_report.json"
OUTCOMES = ("win", "lose", "tie")  # the paper's wedge order: the model, its opponent, tie


def unblind(study: Study, votes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per vote and criterion: which model the rater preferred (None for a tie), from the order recorded with
    the vote, and the outcome for the task's first model."""
    rows = []
    for vote in votes:
        task = study.tasks[vote["task"]]
        shown = (vote["model_a"], vote["model_b"])
        for criterion, choice in vote["choices"].items():
            winner = None if choice == "tie" else shown[0] if choice == "A" else shown[1]
            outcome = "tie" if winner is None else "win" if winner == task.models[0] else "lose"
            rows.append(
                {
                    "rater": vote["rater"],
                    "task": task.index,
                    "item": task.item,
                    "model": task.models[0],
                    "opponent": task.models[1],
                    "shown": list(shown),
                    "criterion": criterion,
                    "choice": choice,
                    "winner": winner,
                    "outcome": outcome,
                    # A store from before seconds were checked may hold inf/NaN, which JSON cannot write.
                    "seconds": vote["seconds"] if vote["seconds"] is None or math.isfinite(vote["seconds"]) else None,
                }
            )
    return rows


def fraction_interval(
    counts: np.ndarray, totals: np.ndarray, confidence: float, resamples: int, seed: int
) -> list[float] | None:
    """The percentile bootstrap interval of sum(counts)/sum(totals) over tasks resampled with replacement."""
    from scipy.stats import bootstrap

    if len(counts) < 2:
        return None  # one task: nothing to resample
    point = counts.sum() / totals.sum()
    if np.all(counts / totals == point):
        return [float(point), float(point)]  # every task alike: the interval is the point (scipy warns, degenerate)
    result = bootstrap(
        (counts, totals),
        lambda k, n, axis: k.sum(axis=axis) / n.sum(axis=axis),
        paired=True,
        vectorized=True,
        n_resamples=resamples,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return [float(result.confidence_interval.low), float(result.confidence_interval.high)]


def fleiss(outcomes_by_task: dict[int, list[str]]) -> dict[str, Any] | None:
    from statsmodels.stats.inter_rater import fleiss_kappa

    shared = [votes for votes in outcomes_by_task.values() if len(votes) >= 2]
    if not shared:
        return None
    m = min(len(votes) for votes in shared)
    table = np.array([[votes[:m].count(o) for o in OUTCOMES] for votes in shared])
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = fleiss_kappa(table, method="fleiss")
    return {"kappa": _number(kappa), "tasks": len(shared), "raters_per_task": m}


def cohen_pairs(outcome_by_rater: dict[str, dict[int, str]]) -> list[dict[str, Any]]:
    from statsmodels.stats.inter_rater import cohens_kappa

    pairs = []
    for a, b in itertools.combinations(sorted(outcome_by_rater), 2):
        common = sorted(set(outcome_by_rater[a]) & set(outcome_by_rater[b]))
        if len(common) < 2:
            continue
        table = np.zeros((3, 3))
        for task in common:
            table[OUTCOMES.index(outcome_by_rater[a][task]), OUTCOMES.index(outcome_by_rater[b][task])] += 1
        agree = float(np.trace(table) / table.sum())
        with np.errstate(divide="ignore", invalid="ignore"):
            kappa = cohens_kappa(table, return_results=False)
        pairs.append({"raters": [a, b], "tasks": len(common), "agreement": agree, "kappa": _number(kappa)})
    return pairs


def build_report(
    study: Study, store: VoteStore, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> dict[str, Any]:
    rows = unblind(study, store.latest_votes())
    comparisons = []
    for model, opponent in itertools.combinations(study.models, 2):
        mine = [r for r in rows if (r["model"], r["opponent"]) == (model, opponent)]
        criteria = {}
        for criterion in study.criteria:
            votes = [r for r in mine if r["criterion"] == criterion]
            by_task: dict[int, list[str]] = defaultdict(list)
            by_rater: dict[str, dict[int, str]] = defaultdict(dict)
            for r in votes:
                by_task[r["task"]].append(r["outcome"])
                by_rater[r["rater"]][r["task"]] = r["outcome"]
            counts = {o: sum(r["outcome"] == o for r in votes) for o in OUTCOMES}
            tasks = sorted(by_task)
            totals = np.array([len(by_task[t]) for t in tasks], dtype=float)
            criteria[criterion] = {
                "votes": len(votes),
                "tasks": len(tasks),
                "counts": counts,
                "fractions": {o: counts[o] / len(votes) if votes else None for o in OUTCOMES},
                "ci": {
                    o: fraction_interval(
                        np.array([by_task[t].count(o) for t in tasks], dtype=float), totals, confidence, resamples, seed
                    )
                    if votes
                    else None
                    for o in OUTCOMES
                },
                "agreement": {"fleiss": fleiss(by_task), "cohen": cohen_pairs(by_rater)},
            }
        comparisons.append(
            {"model": model, "opponent": opponent, "criteria": criteria, "raters": sorted({r["rater"] for r in mine})}
        )
    return {
        "study": str(study.directory),
        "items": len(study.items),
        "models": study.models,
        "criteria": study.criteria,
        "confidence": confidence,
        "resamples": resamples,
        "outcomes": {"win": "the model's answer was better", "lose": "the opponent's was better", "tie": "a tie"},
        "comparisons": comparisons,
    }


def _number(value) -> float | None:
    value = float(value)
    return None if np.isnan(value) else value  # kappa is undefined when every vote is in one category
