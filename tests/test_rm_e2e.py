"""End to end on the CLI: train a reward model on the demo pairs, reload its export, score a file, best-of-N."""

from __future__ import annotations

import json

import pytest

from helpers.configs import rm_overrides
from helpers.runs import run_cli, scalars

pytestmark = pytest.mark.slow


def test_cli_reward_model_demo_trains_exports_scores_and_ranks(tmp_path):
    from transformers import AutoModelForSequenceClassification

    proc = run_cli("gpt4llm.train", rm_overrides(tmp_path), cwd=tmp_path)
    run = tmp_path / "run"
    assert f"Run directory: {run}" in proc.stdout and "Export:" in proc.stdout

    logged = scalars(run)
    for tag in (
        "train/loss",
        "train/rm_acc",
        "train/lr",
        "train/tokens_per_s",
        "val/loss",
        "val/rm_acc",
        "val/rm_margin",
        "val/reward_mean",
        "val/reward_std",
    ):
        assert tag in logged, f"{tag} missing from TensorBoard: {sorted(logged)}"
    assert len(logged["train/loss"]) == 6 and len(logged["val/rm_acc"]) == 2  # before training, and after
    assert all(0 <= a <= 1 for a in logged["val/rm_acc"]) and "val/exact_match" not in logged

    export = run / "export"
    model = AutoModelForSequenceClassification.from_pretrained(export)
    assert model.config.num_labels == 1 and model.config.reward_max_length == 256
    assert model.config.reward_mean == pytest.approx(logged["val/reward_mean"][-1], abs=1e-5)
    assert model.config.reward_std == pytest.approx(logged["val/reward_std"][-1], abs=1e-5)

    # Score the held-out demo pairs' responses with the export, from the command line.
    pairs = json.loads(next((tmp_path / "data" / "demo").glob("demo_pairs_*.json")).read_text())[:6]
    responses = tmp_path / "responses.jsonl"
    lines = [json.dumps({"prompt": p["prompt"], "response": p[k]}) for p in pairs for k in ("chosen", "rejected")]
    responses.write_text("\n".join(lines) + "\n")
    run_cli(
        "gpt4llm.score",
        [f"reward_model={export}", f"input={responses}", f"hydra.run.dir={tmp_path / 'score'}"],
        cwd=tmp_path,
    )
    scored = [json.loads(line) for line in (tmp_path / "responses.scored.jsonl").read_text().splitlines()]
    assert len(scored) == 12 and all({"prompt", "response", "reward", "reward_normalized"} <= set(s) for s in scored)
    std, mean = model.config.reward_std, model.config.reward_mean
    assert all(s["reward_normalized"] == pytest.approx((s["reward"] - mean) / std, abs=1e-6) for s in scored)

    # Best-of-N: the tiny causal LM (the SFT model's stand-in) samples, the trained reward model ranks.
    prompts = tmp_path / "questions.json"
    prompts.write_text(
        json.dumps(
            [
                {"id": "a", "instruction": "Sort the numbers in ascending order.", "input": "3, 1, 2"},
                {"id": "b", "instruction": "Which number is larger, 4 or 9?"},
            ]
        )
    )
    sft = tmp_path / "data" / "models" / "tiny-llama"
    run_cli(
        "gpt4llm.bestofn",
        [
            f"sft_model={sft}",
            f"reward_model={export}",
            f"prompts={prompts}",
            "n=3",
            "max_new_tokens=8",
            f"hydra.run.dir={tmp_path / 'bon'}",
        ],
        cwd=tmp_path,
    )
    rows = [json.loads(line) for line in (tmp_path / "bon" / "bestofn.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"]
    for row in rows:
        assert [c["rank"] for c in row["ranked"]] == [1, 2, 3] and {"response", "reward"} == set(row["baseline"])
        assert [c["reward"] for c in row["ranked"]] == sorted((c["reward"] for c in row["ranked"]), reverse=True)


def test_rm_commands_compose_offline():
    from omegaconf import OmegaConf

    from gpt4llm.app.checks import check_config
    from helpers.configs import ROOT, compose_train

    for args in (
        ["task=rm", "model=opt1.3b", "data=comparison_gpt4"],
        ["task=rm", "data=local_pairs", "data.path=mine.jsonl"],
    ):
        cfg = compose_train(args)
        check_config(cfg)
        assert cfg.task._target_ == "gpt4llm.models.reward_module.RewardModule"
        assert cfg.data._target_ == "gpt4llm.data.pair_datamodule.PairDataModule"
    proc = run_cli("gpt4llm.train", ["experiment=paper_rm_opt1.3b", "--cfg", "job"], cwd=ROOT)
    c = OmegaConf.create(proc.stdout)
    c.paths.output_dir = "/tmp/run"
    c = OmegaConf.to_container(c, resolve=True)
    assert c["model"]["path"] == "facebook/opt-1.3b" and c["data"]["path"].endswith("comparison_data_v2.json")
    assert c["task"]["_target_"] == "gpt4llm.models.reward_module.RewardModule" and c["trainer"]["max_epochs"] == 1
    assert c["global_batch_size"] == 64 and c["task"]["max_length"] == 512
