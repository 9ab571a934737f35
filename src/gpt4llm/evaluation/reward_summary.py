"""Reward-model evaluation: rewards of a model's answers, and the paper's best-of-N ranking groups.

Scoring is `gpt4llm.inference.scoring.score_records` (the reward model's own code). A best-of-N file is
`gpt4llm.bestofn`'s output: per prompt, N samples `ranked` 1..N by reward, and the greedy `baseline`. The paper's
ranking group k is
every prompt's k-th ranked answer and group B the baselines (section 3(e) of docs/paper_spec.md); each group is
also written as a responses file (model name rank1..rankN, B), which `evaluate metric=judge` scores against an
opponent and `plots` draws as the ranking bars.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from gpt4llm.errors import RecordError
from gpt4llm.io.json_files import read_json_records


def is_best_of_n(path: str | Path) -> bool:
    records = read_json_records(path)
    return bool(records) and isinstance(records[0], dict) and "ranked" in records[0]


def ranking_groups(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """group name (rank1..rankN, B) -> answers in the responses layout (id, instruction, input, response, reward)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for index, row in enumerate(read_json_records(path)):
        where = f"{path}: record {index}"
        for name, kind in (("id", (int, str)), ("instruction", str), ("ranked", list), ("baseline", dict)):
            if not isinstance(row, dict) or name not in row:
                raise RecordError(f"{where}: field '{name}' is missing (expected gpt4llm.bestofn's output)")
            if not isinstance(row[name], kind):
                raise RecordError(f"{where}: field '{name}' is {type(row[name]).__name__}")
        base = {"id": row["id"], "instruction": row["instruction"], "input": row.get("input", "")}
        for k, item in enumerate(row["ranked"]):
            if (
                not isinstance(item, dict)
                or not isinstance(item.get("response"), str)
                or not isinstance(item.get("reward"), (int, float))
            ):
                raise RecordError(f"{where}: field 'ranked[{k}]' needs a string 'response' and a number 'reward'")
            groups[f"rank{item.get('rank', k + 1)}"].append(
                base
                | {"response": item["response"], "reward": item["reward"], "model": f"rank{item.get('rank', k + 1)}"}
            )
        baseline = row["baseline"]
        if not isinstance(baseline.get("response"), str):
            raise RecordError(f"{where}: field 'baseline.response' is missing")
        groups["B"].append(base | {"response": baseline["response"], "reward": baseline.get("reward"), "model": "B"})
    sizes = {name: len(answers) for name, answers in groups.items()}
    if len(set(sizes.values())) > 1:
        raise RecordError(f"{path}: the prompts have different numbers of ranked answers ({sizes})")
    return dict(sorted(groups.items(), key=lambda kv: (kv[0] == "B", int(kv[0][4:]) if kv[0] != "B" else 0)))


def score_answers(model_dir: str | Path, answers: list[dict], batch_size: int = 8) -> list[float]:
    """The reward model's reward for each answer, with the prompt built from its instruction and input."""
    from gpt4llm.inference.scoring import score_records

    return score_records(
        model_dir,
        [{"instruction": a["instruction"], "input": a.get("input", ""), "response": a["response"]} for a in answers],
        batch_size,
    )


def summarize_rewards(answers: list[dict]) -> dict[str, Any]:
    """Mean reward overall and per category (where the answers have one), and how many were scored."""
    rewards = [a["reward"] for a in answers if a.get("reward") is not None]
    per_category: dict[str, list[float]] = defaultdict(list)
    for a in answers:
        if a.get("category") is not None and a.get("reward") is not None:
            per_category[a["category"]].append(a["reward"])
    return {
        "scored": len(rewards),
        "mean_reward": sum(rewards) / len(rewards) if rewards else None,
        "per_category": {
            c: {"scored": len(v), "mean_reward": sum(v) / len(v)} for c, v in sorted(per_category.items())
        },
    }
