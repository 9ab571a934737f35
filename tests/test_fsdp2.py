"""strategy=fsdp2 (torch's fully_shard through Lightning's ModelParallelStrategy) as two CPU processes (gloo) under
torchrun: it trains as DDP does on the same two processes (DDP's all-reduce is the independent code path: the same
batches, the same averaged gradients), resumes exactly from its sharded checkpoint directory after a SIGKILL, and
exports whole weights. LoRA, DPO (with a sharded live reference) and GRPO under FSDP2 run in test_lora.py,
test_dpo.py and test_online_rl.py with the other strategies."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.configs import ROOT, demo_overrides, rm_overrides
from helpers.runs import scalars_by_step

pytestmark = pytest.mark.slow


def torchrun(tmp: Path, name: str, base: list[str], *extra: str, fails: bool = False) -> Path:
    """`gpt4llm.train` as two processes under torchrun into tmp/<name>; returns the run directory."""
    run_dir = tmp / name
    args = [*base, f"hydra.run.dir={run_dir}", *extra]
    args = list({a.split("=", 1)[0]: a for a in args}.values())  # a key given twice: its later value
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        GPT4LLM_RUN_ID=name,
        PYTHONPATH=str(ROOT / "tests"),
    )
    proc = subprocess.run(
        [*cmd, "-m", "gpt4llm.train", *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=600
    )
    assert (proc.returncode != 0) == fails, proc.stdout[-3000:] + proc.stderr[-5000:]
    return run_dir


def sft(tmp: Path, *extra: str) -> list[str]:
    return demo_overrides(
        tmp,
        f"paths.log_dir={tmp / 'logs'}",
        "trainer.devices=2",
        "validate_first=false",
        "callbacks.exact_match=null",
        *extra,
    )


def assert_same_losses(ours: dict[int, float], theirs: dict[int, float], rel: float) -> None:
    assert sorted(ours) == sorted(theirs)
    for step, value in theirs.items():
        assert ours[step] == pytest.approx(value, rel=rel), f"step {step}: {ours[step]} vs {value}"


def test_fsdp2_trains_as_ddp_resumes_exactly_from_its_sharded_checkpoint_and_exports_whole(tmp_path):
    base = sft(
        tmp_path,
        # batches that supervise more positions than one chunk: the chunked loss runs inside the sharded forward
        "data.demo.num_records=1200",
        "data.batch_size=128",
        "trainer.max_epochs=3",  # 5 batches an epoch: step 8 is mid-epoch
        "trainer.max_steps=12",
        "callbacks.checkpoint.every_n_train_steps=4",
        "callbacks.checkpoint.save_top_k=-1",
    )
    ddp = torchrun(tmp_path, "ddp", base, "strategy=ddp")
    straight = torchrun(tmp_path, "straight", base, "strategy=fsdp2")
    # fp32: sharded gradients reduce-scattered give DDP's all-reduced ones up to summation order
    assert_same_losses(scalars_by_step(straight)["train/loss"], scalars_by_step(ddp)["train/loss"], rel=1e-5)
    exported, reference = (
        load_file(straight / "export" / "model.safetensors"),
        load_file(ddp / "export" / "model.safetensors"),
    )
    assert sorted(exported) == sorted(reference)
    for name in reference:
        torch.testing.assert_close(exported[name], reference[name], rtol=0, atol=1e-5, msg=name)

    step8 = straight / "checkpoints" / "step8.ckpt"  # one shard per rank and Lightning's state beside them
    assert sorted(p.name for p in step8.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]

    # killed (SIGKILL, both ranks) during step 10, then resumed from step 8 by a new job
    killed = torchrun(
        tmp_path,
        "killed",
        base,
        "strategy=fsdp2",
        "+callbacks.die._target_=helpers.killable.DieAt",
        "+callbacks.die.step=10",
        fails=True,
    )
    assert not (killed / "export").exists()
    resumed = torchrun(
        tmp_path, "resumed", base, "strategy=fsdp2", f"ckpt_path={killed / 'checkpoints' / 'step8.ckpt'}"
    )
    again, whole = scalars_by_step(resumed), scalars_by_step(straight)
    assert sorted(again["train/loss"]) == list(range(8, 12))  # steps 9-12 (logged 0-based)
    for tag in ("train/loss", "train/lr"):  # the same batches at the same point of the schedule
        for step, value in again[tag].items():
            assert value == pytest.approx(whole[tag][step], rel=1e-6, abs=1e-9), f"{tag} at step {step}"
    continued = load_file(resumed / "export" / "model.safetensors")
    exported = load_file(straight / "export" / "model.safetensors")
    for name in exported:
        torch.testing.assert_close(continued[name], exported[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("task", ["sft", "rm"])
def test_fsdp2_in_bf16_with_activation_checkpointing_trains_as_ddp(task, tmp_path):
    """16-bit gathered weights and fp32 gradient reduction (FSDP2's mixed precision) against DDP under autocast."""
    common = ("trainer.devices=2", "validate_first=false", "trainer.max_steps=6", "trainer.precision=bf16-mixed")
    if task == "rm":
        base = rm_overrides(tmp_path, f"paths.log_dir={tmp_path / 'logs'}", *common)
    else:
        base = sft(tmp_path, *common)
    base.append("model.gradient_checkpointing=true")
    ddp = scalars_by_step(torchrun(tmp_path, "ddp", base, "strategy=ddp"))["train/loss"]
    ours = scalars_by_step(torchrun(tmp_path, "fsdp2", base, "strategy=fsdp2"))["train/loss"]
    # bf16 weights against DDP's fp32 weights under autocast: the DeepSpeed tests' tolerances for bf16
    assert sorted(ours) == sorted(ddp)
    tolerance = {"sft": 0.01, "rm": 0.03}[task]
    assert max(abs(ours[s] - ddp[s]) for s in ddp) < tolerance, (ours, ddp)
