"""Sweeps as first-class runs: the metric a sweeper optimises is a setting, TensorBoard's HParams tab has every job's
hyperparameters with its metrics, an Optuna search ships and runs, and the console scripts complete on Tab."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from tensorboard.plugins.hparams import plugin_data_pb2

from helpers.configs import demo_overrides
from helpers.runs import events, run_cli

pytestmark = pytest.mark.slow


def hparams_of(run: Path) -> tuple[dict, set[str]]:
    """The hyperparameters and metric tags TensorBoard's HParams plugin reads from a run's events."""
    content = events(run, tensors=0).PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    params = {
        k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
        for k, v in session.session_start_info.hparams.items()
    }
    return params, {m.name.tag for m in experiment.experiment.metric_infos}


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
