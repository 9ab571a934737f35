"""Two CPU processes (gloo) under torchrun train, checkpoint and export into one run directory; a killed run resumes
at its step, with its schedule and data order."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers.configs import ROOT, compose_train, demo_overrides
from helpers.runs import scalars_by_step

pytestmark = pytest.mark.slow

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def overrides(tmp: Path, run_dir: Path | None, *extra: str) -> list[str]:
    args = [a for a in demo_overrides(tmp) if not a.startswith("hydra.run.dir=")]
    return args + ([f"hydra.run.dir={run_dir}"] if run_dir else []) + list(extra)


def test_torchrun_two_cpu_processes_train_and_export_into_one_run_directory(tmp_path):
    env = ENV | {"GPT4LLM_RUN_ID": "job42"}
    args = overrides(
        tmp_path,
        None,
        f"paths.log_dir={tmp_path / 'logs'}",
        "trainer.devices=2",
        "strategy=ddp",
        "trainer.max_steps=4",
        "validate_first=false",
        "callbacks.exact_match=null",
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "gpt4llm.train",
        *args,
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    runs = list((tmp_path / "logs" / "train" / "runs").iterdir())
    assert [r.name for r in runs] == ["job42"]  # one run directory for both ranks
    run = runs[0]
    writers = {p.name.split(".")[-2] for p in (run / "tensorboard").glob("events.out.tfevents.*")}
    assert len(writers) == 1  # TensorBoard written by one process (rank 0)
    assert len(scalars_by_step(run)["train/loss"]) == 4
    log = (run / "train.log").read_text()
    assert "][rank 0][" in log and "][rank 1][" in log  # both ranks' lines, each marked
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4

    from transformers import AutoModelForCausalLM

    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    exported = AutoModelForCausalLM.from_pretrained(run / "export").state_dict()
    for name, tensor in exported.items():
        torch.testing.assert_close(tensor, state[f"model.{name}"], rtol=0, atol=0, msg=name)


def test_resume_after_the_process_was_killed(tmp_path):
    common = (
        "trainer.max_steps=12",
        "validate_first=false",
        "callbacks.exact_match=null",
        "callbacks.checkpoint.every_n_train_steps=4",
        "callbacks.checkpoint.save_top_k=-1",
    )
    killed_dir = tmp_path / "killed"
    slow = ("export=false", "+callbacks.slow._target_=helpers.killable.SlowSteps", "+callbacks.slow.seconds=0.4")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpt4llm.train", *overrides(tmp_path, killed_dir, *common, *slow)],
        cwd=tmp_path,
        env=ENV | {"PYTHONPATH": str(ROOT / "tests")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    step8 = killed_dir / "checkpoints" / "step8.ckpt"
    deadline = time.monotonic() + 300
    while not step8.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.6)  # the checkpoint written, step 9 under way
    proc.kill()  # SIGKILL: no handler, no final checkpoint
    stderr = proc.communicate()[1]
    assert proc.returncode == -9, stderr[-3000:]
    checkpoints = sorted(p.name for p in (killed_dir / "checkpoints").iterdir())
    assert checkpoints == ["last.ckpt", "step4.ckpt", "step8.ckpt"], checkpoints
    assert torch.load(killed_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 8

    from gpt4llm.train import (
        train,  # the resumed and the uninterrupted run, in this process
    )

    def run(name: str, *extra: str) -> Path:
        cfg = compose_train(overrides(tmp_path, None, *common, *extra))
        cfg.paths.output_dir = str(tmp_path / name)
        (tmp_path / name).mkdir()
        train(cfg)
        return tmp_path / name

    resumed_dir = run("resumed", f"ckpt_path={killed_dir / 'checkpoints' / 'last.ckpt'}")
    straight_dir = run("straight")
    resumed, straight = scalars_by_step(resumed_dir), scalars_by_step(straight_dir)
    assert sorted(resumed["train/loss"]) == list(range(8, 12))  # steps 9-12 (logged 0-based): it went on at step 8
    for tag in ("train/loss", "train/lr"):  # same batches (data order) and the same point of the schedule
        for step, value in resumed[tag].items():
            assert value == pytest.approx(straight[tag][step], rel=1e-6, abs=1e-9), f"{tag} at step {step}"
    from safetensors.torch import load_file

    a, b = (
        load_file(resumed_dir / "export" / "model.safetensors"),
        load_file(straight_dir / "export" / "model.safetensors"),
    )
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
