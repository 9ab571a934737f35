"""metric=reward: rewards of a responses file from an exported reward model, and best-of-N ranking groups 1..N, B."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from gpt4llm.evaluate import evaluate
from gpt4llm.evaluation.responses import read_responses

BEST_OF_3 = [
    {
        "id": 1,
        "instruction": "Say hi.",
        "input": "",
        "ranked": [
            {"rank": 1, "response": "hi!", "reward": 2.0, "draw": 2},
            {"rank": 2, "response": "hi", "reward": 1.0, "draw": 0},
            {"rank": 3, "response": "no", "reward": -1.0, "draw": 1},
        ],
        "baseline": {"response": "hello", "reward": 0.5},
    },
    {
        "id": 2,
        "instruction": "Add.",
        "input": "1 2",
        "ranked": [
            {"rank": 1, "response": "3", "reward": 4.0, "draw": 0},
            {"rank": 2, "response": "three", "reward": 3.0, "draw": 1},
            {"rank": 3, "response": "4", "reward": 0.0, "draw": 2},
        ],
        "baseline": {"response": "3", "reward": 1.5},
    },
]


def config(tmp_path, responses, model=None):
    out = tmp_path / "run"
    out.mkdir(exist_ok=True)
    return OmegaConf.create(
        {
            "responses": responses,
            "metric": {"name": "reward", "model": model, "batch_size": 4},
            "paths": {"output_dir": str(out)},
        }
    ), out


def test_best_of_n_groups_in_the_papers_layout(tmp_path):
    path = tmp_path / "bestofn.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in BEST_OF_3))
    cfg, out = config(tmp_path, str(path))
    summary = evaluate(cfg)
    assert list(summary) == ["rank1", "rank2", "rank3", "B"]
    assert [summary[g]["mean_reward"] for g in summary] == [3.0, 2.0, -0.5, 1.0]
    assert json.loads((out / "reward_summary.json").read_text())["B"]["scored"] == 2
    rank1 = read_responses(out / "ranking_groups" / "rank1" / "responses.jsonl")
    assert [(a["id"], a["response"], a["model"]) for a in rank1] == [(1, "hi!", "rank1"), (2, "3", "rank1")]


def test_rewards_of_a_responses_file_are_the_reward_models(tmp_path, tiny_model_dir, tokenizer):
    from gpt4llm.inference.scoring import score_records
    from gpt4llm.models.reward_module import load_reward_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rm_dir = tmp_path / "rm"
        torch.manual_seed(0)
        load_reward_model(str(tiny_model_dir), tokenizer).save_pretrained(rm_dir)
        tokenizer.save_pretrained(rm_dir)
        lines = [
            {"id": i, "model": "tiny", "category": c, "instruction": f"Q{i}", "input": "", "response": r}
            for i, (c, r) in enumerate([("a", "yes"), ("a", "no"), ("b", "maybe")])
        ]
        path = tmp_path / "responses.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        cfg, out = config(tmp_path, str(path), model=str(rm_dir))
        summary = evaluate(cfg)
        direct = score_records(
            rm_dir, [{"instruction": x["instruction"], "input": "", "response": x["response"]} for x in lines]
        )
    finally:
        torch.set_num_threads(threads)
    scored = [json.loads(line) for line in (out / "reward_scores_tiny.jsonl").read_text().splitlines()]
    assert [s["reward"] for s in scored] == pytest.approx(direct, abs=1e-6)
    assert summary["tiny"]["mean_reward"] == pytest.approx(sum(direct) / 3, abs=1e-6)
    assert summary["tiny"]["per_category"]["a"]["scored"] == 2

    cfg, _ = config(tmp_path, str(path))
    with pytest.raises(ValueError, match="needs metric.model"):
        evaluate(cfg)
