"""Sweeps as first-class runs: the metric a sweeper optimises is a setting, TensorBoard's HParams tab has every job's
hyperparameters with its metrics, an Optuna search ships and runs, and the console scripts complete on Tab."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers.configs import ROOT, demo_overrides
from helpers.runs import hparams_of, run_cli

pytestmark = pytest.mark.slow


def test_hparams_tab_holds_the_run_and_the_sweeper_gets_the_chosen_metric(tmp_path):
    proc = run_cli(
        "gpt4llm.train",
        demo_overrides(tmp_path, "trainer.max_steps=3", "optimized_metric=val/exact_match"),
        cwd=tmp_path,
    )
    params, metrics = hparams_of(tmp_path / "run")
    assert params["task.optimizer.lr"] == pytest.approx(3e-3) and params["data.batch_size"] == 8
    assert {"hp/val/loss", "hp/val/exact_match"} <= metrics
    assert "Optimized metric val/exact_match:" in proc.stdout


@pytest.mark.skipif(
    not shutil.which("gpt4llm-train") or os.environ.get("SKIP_OPTUNA"), reason="console scripts not installed"
)
def test_optuna_search_runs_two_trials(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    args = demo_overrides(
        tmp_path, "trainer.max_steps=5", "validate_first=false", "export=false", "callbacks.exact_match=null"
    )
    run_cli("gpt4llm.train", ["hparams_search=optuna_lr", "hydra.sweeper.n_trials=2", *args], cwd=tmp_path)
    results = (tmp_path / "sweep" / "optimization_results.yaml").read_text()
    assert "best_params" in results and "task.optimizer.lr" in results
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.name.isdigit()) == ["0", "1"]


@pytest.mark.skipif(not shutil.which("gpt4llm-train"), reason="console scripts not installed (pip install -e .)")
def test_tab_completion_of_the_console_scripts(tmp_path):
    script = subprocess.run(
        ["gpt4llm-train", "-sc", "install=bash"], capture_output=True, text=True, cwd=tmp_path, check=True
    ).stdout
    assert "complete" in script and "gpt4llm-train" in script
    env = dict(os.environ, COMP_LINE="gpt4llm-train trai", HF_HUB_OFFLINE="1")
    offered = subprocess.run(
        ["gpt4llm-train", "-sc", "query=bash"], capture_output=True, text=True, cwd=tmp_path, env=env
    ).stdout
    assert "trainer=" in offered.split()
    env["COMP_LINE"] = "gpt4llm-train trainer="
    offered = subprocess.run(
        ["gpt4llm-train", "-sc", "query=bash"], capture_output=True, text=True, cwd=tmp_path, env=env
    ).stdout
    assert {"trainer=cpu", "trainer=gpu", "trainer=v100x16"} <= set(offered.split())


@pytest.mark.skipif(not shutil.which("gpt4llm-serve"), reason="console scripts not installed (pip install -e .)")
def test_the_readmes_one_line_completes_every_console_script(tmp_path):
    (line,) = [x.strip() for x in (ROOT / "README.md").read_text().splitlines() if "compgen -c gpt4llm-" in x]
    bound = subprocess.run(
        ["bash", "-c", f"{line}\ncomplete -p"], capture_output=True, text=True, cwd=tmp_path, check=True
    ).stdout
    scripts = {p.name for p in Path(shutil.which("gpt4llm-serve")).parent.glob("gpt4llm-*")}
    assert len(scripts) == 13
    for script in scripts:
        assert f"-F hydra_bash_completion {script}" in bound, script


def test_a_sweep_ends_with_its_best_job(tmp_path):
    proc = run_cli(
        "gpt4llm.train",
        ["-m", "task.optimizer.lr=1e-4,3e-3", *demo_overrides(tmp_path, "trainer.max_steps=3", "export=false")],
        cwd=tmp_path,
    )
    best = [line for line in proc.stdout.splitlines() if line.startswith("Best job: ")]
    assert len(best) == 1 and "val/loss=" in best[0] and "the lowest of 2 jobs" in best[0]
    assert str(tmp_path / "sweep" / "1") in best[0]  # 3e-3 learns within three steps; 1e-4 barely moves


def test_the_best_job_follows_the_metrics_direction(tmp_path):
    import json

    from gpt4llm.app.sweep_summary import best_job

    for job, (loss, accuracy) in enumerate([(1.5, 0.6), (0.9, 0.4), (1.2, 0.7)]):
        (tmp_path / str(job)).mkdir()
        (tmp_path / str(job) / "metrics.json").write_text(json.dumps({"val/loss": loss, "val/rm_acc": accuracy}))
    assert best_job(tmp_path, "val/loss").startswith(f"Best job: {tmp_path / '1'} (val/loss=0.9, the lowest of 3")
    assert best_job(tmp_path, "val/rm_acc").startswith(f"Best job: {tmp_path / '2'} (val/rm_acc=0.7, the highest")
    assert str(tmp_path / "1") in best_job(tmp_path, "val/rm_acc", direction="minimize")
    assert best_job(tmp_path, "val/exact_match") is None
