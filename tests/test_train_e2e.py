"""End to end: the CLI trains, logs, checkpoints, exports; multirun; resume continues exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers.configs import compose_train, demo_overrides
from helpers.runs import run_cli, scalars

pytestmark = pytest.mark.slow


def test_cli_demo_run_writes_everything(tmp_path):
    proc = run_cli("gpt4llm.train", demo_overrides(tmp_path), cwd=tmp_path)
    run = tmp_path / "run"
    assert f"Run directory: {run}" in proc.stdout and "Export:" in proc.stdout
    # the whole process from its start: the interpreter and imports are part of what a user waits for
    timing = next(line for line in proc.stdout.splitlines() if line.strip().startswith("Time:"))
    assert all(f"{phase} " in timing for phase in ("start-up", "tokenizer and data", "model", "export")), timing
    written = json.loads((run / "metrics.json").read_text())
    assert written["time/start-up_s"] > 1.0  # Python, torch, Lightning, transformers: seconds, not zero

    logged = scalars(run)
    for tag in (
        "train/loss",
        "val/loss",
        "val/ppl",
        "train/lr",
        "train/tokens_per_s",
        "train/pad_fraction",
        "val/exact_match",
    ):
        assert tag in logged, f"{tag} missing from TensorBoard: {sorted(logged)}"
    assert len(logged["train/loss"]) == 6
    assert len(logged["val/loss"]) == 2  # before training, and after the epoch
    assert max(logged["train/lr"]) == pytest.approx(3e-3) and logged["train/tokens_per_s"][-1] > 0
    assert set(logged["train/pad_fraction"]) == {0.0}  # the tiny model's attention packs by default

    assert (run / "checkpoints" / "last.ckpt").exists()
    assert (run / ".hydra" / "config.yaml").exists()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run / "export")
    tokenizer = AutoTokenizer.from_pretrained(run / "export")
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)


def test_multirun_gives_each_job_its_own_run(tmp_path):
    args = [a for a in demo_overrides(tmp_path, "trainer.max_steps=2", "validate_first=false", "export=false")]
    run_cli("gpt4llm.train", ["-m", "task.optimizer.lr=1e-4,3e-4", *args], cwd=tmp_path)
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1"]
    lrs = []
    for job in jobs:
        assert list((job / "tensorboard").glob("events.out.tfevents.*"))
        lrs.append(
            float(
                next(x for x in (job / ".hydra" / "overrides.yaml").read_text().splitlines() if "lr=" in x).split("=")[
                    1
                ]
            )
        )
    assert lrs == [1e-4, 3e-4]


def test_prepare_writes_processed_examples_and_report(tmp_path):
    proc = run_cli("gpt4llm.prepare", demo_overrides(tmp_path), cwd=tmp_path)
    run = tmp_path / "run"

    report = json.loads((run / "prepared" / "report.json").read_text())
    assert report["splits"] == {"train": 200, "validation": 40}
    lines = (run / "prepared" / "train.jsonl").read_text().splitlines()
    assert len(lines) == 200 and set(json.loads(lines[0])) == {"index", "input_ids", "labels"}
    assert "supervised_token_fraction" in proc.stdout


def exported_weights(overrides: list[str], out: Path) -> dict[str, torch.Tensor]:
    """Trains in-process (the `train` the CLI runs) and reads back the exported weights."""
    from safetensors.torch import load_file

    from gpt4llm.train import train

    cfg = compose_train(overrides)
    cfg.paths.output_dir = str(out)
    out.mkdir(parents=True)
    train(cfg)
    return load_file(out / "export" / "model.safetensors")


def test_resume_continues_step_schedule_and_data_order(tmp_path):
    common = demo_overrides(
        tmp_path,
        "trainer.max_steps=8",
        "validate_first=false",
        "callbacks.checkpoint.every_n_train_steps=4",
        "callbacks.checkpoint.save_top_k=-1",
        "callbacks.exact_match=null",
        "trainer.max_epochs=2",
    )
    straight = exported_weights(common, tmp_path / "straight")
    checkpoint = tmp_path / "straight" / "checkpoints" / "step4.ckpt"
    assert checkpoint.exists(), sorted(p.name for p in (tmp_path / "straight" / "checkpoints").iterdir())
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 4
    resumed = exported_weights(common + [f"ckpt_path={checkpoint}"], tmp_path / "resumed")
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6, msg=f"{name} differs after resume")
