"""What a training run tells its loggers and its console: the settings runs are compared by (not the whole config), to
Weights & Biases (offline) and MLflow (a local store) beside TensorBoard, and a console without the libraries' noise."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest

from gpt4llm.training.hyperparameters import compared_hyperparameters
from helpers.configs import compose_train, demo_overrides
from helpers.runs import hparams_of, run_cli


def test_the_compared_settings_hold_no_class_paths_machine_paths_or_unset_values():
    cfg = compose_train(["experiment=paper_sft_llama7b_gpt4", "model.path=/home/ann/models/llama-7b"])
    params = compared_hyperparameters(cfg, {"model": "llama7b", "data": "alpaca_gpt4", "peft": "none"})
    assert params["model"] == "llama7b" and params["data"] == "alpaca_gpt4"
    assert params["model.path"] == "models/llama-7b"  # a local path by its last two parts
    assert params["task.optimizer.lr"] == 2e-5 and params["global_batch_size"] == 64
    assert params["trainer.max_epochs"] == 3 and params["trainer.precision"] == cfg.trainer.precision
    assert "task.beta" not in params  # no DPO settings in an SFT run
    for key, value in params.items():
        assert isinstance(value, (int, float, str, bool)) and "_target_" not in key
        assert value != "None" and not str(value).startswith("/"), (key, value)
    dpo = compared_hyperparameters(compose_train(["task=dpo", "peft=lora", "data=local_pairs", "data.path=/x.json"]))
    assert dpo["task.beta"] == 0.1 and dpo["task.reference"] == "precomputed"
    assert dpo["peft.target_modules"] == "q_proj,v_proj" and dpo["peft.r"] == 8


def test_the_libraries_per_run_noise_is_dropped_and_their_other_messages_kept(caplog):
    from gpt4llm.app.cli import quiet_libraries

    quiet_libraries()
    deepspeed = logging.getLogger("DeepSpeed")
    with caplog.at_level(logging.INFO):
        deepspeed.addHandler(caplog.handler)  # once deepspeed is imported, its logger does not propagate
        propagates, deepspeed.propagate = deepspeed.propagate, False
        deepspeed.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect")
        deepspeed.warning("ZeRO stage 3: offloading")
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("💡 Tip: try installing litlogger")
        deepspeed.removeHandler(caplog.handler)
        deepspeed.propagate = propagates
    assert [r.getMessage() for r in caplog.records] == ["ZeRO stage 3: offloading"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_libraries()  # after simplefilter: its filters go first
        warnings.warn("'set_vital' is deprecated, please do not call", UserWarning, stacklevel=1)
        warnings.warn("something a user wrote is deprecated", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something a user wrote is deprecated"]


@pytest.mark.slow
def test_wandb_offline_and_mlflow_get_the_settings_and_metrics_and_the_console_is_quiet(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the run's own store, not a server of the machine's
    monkeypatch.delenv("WANDB_MODE", raising=False)
    pytest.importorskip("wandb")
    mlflow = pytest.importorskip("mlflow")
    proc = run_cli(
        "gpt4llm.train",
        demo_overrides(
            tmp_path,
            "trainer.max_steps=3",
            "data.val_size=0",
            "export=false",
            "logger=[tensorboard,wandb,mlflow]",
            "logger.wandb.offline=true",
        ),
        cwd=tmp_path,
    )
    run = tmp_path / "run"
    console = proc.stdout + proc.stderr
    for noise in ("💡 Tip", "Setting accelerator to CPU", "Total FLOPs", "set_vital", "LeafSpec", "Loading weights"):
        assert noise not in console, noise
    # nothing held out: what the sweeper gets falls back to the training loss, said once at the start
    assert console.count("optimized_metric falls back to train/loss") == 1 and "was not logged" not in console
    assert "Optimized metric train/loss:" in proc.stdout

    params, _ = hparams_of(run)
    assert params["task.optimizer.lr"] == pytest.approx(3e-3) and params["task"] == "sft"
    assert not any("_target_" in key or str(value).startswith("/") or value == "None" for key, value in params.items())

    (wandb_run,) = (run / "wandb").glob("offline-run-*/run-*.wandb")  # W&B's record of the run, synced later
    record = Path(wandb_run).read_bytes()
    assert b"task.optimizer.lr" in record and b"train/loss" in record and b"_target_" not in record

    client = mlflow.tracking.MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    (logged,) = client.search_runs([client.get_experiment_by_name("gpt4llm").experiment_id])
    assert logged.data.params["task.optimizer.lr"] == "0.003" and logged.data.params["model"] == "tiny"
    assert len(client.get_metric_history(logged.info.run_id, "train/loss")) == 3
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlartifacts").exists()  # all in the run dir
