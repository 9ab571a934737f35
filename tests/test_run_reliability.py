"""A run is one run: one training per run directory at a time, a resume that would train something else refused (the
learning rate honoured), and a resume exact wherever its checkpoint was taken (an epoch's last batch, dropout on),
into one last.ckpt that is always the newest."""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from gpt4llm.data.samplers import LengthGroupedSampler, ShuffledSampler
from gpt4llm.errors import CheckpointError
from gpt4llm.io.study_lock import LockHeld
from gpt4llm.training.callbacks import random_states, scale_learning_rate, set_random_states
from gpt4llm.training.resume import RUN_LOCK, check_settings, leads_launch, run_directory_lock
from helpers.configs import ROOT, compose_train, demo_overrides, rm_overrides
from helpers.runs import scalars_by_step

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


# --- one training per run directory ------------------------------------------------------------------------------
def test_only_the_first_process_of_a_launch_locks_the_run_directory():
    assert leads_launch({})  # one process
    assert leads_launch({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"})  # torchrun's rank 0
    assert not leads_launch({"RANK": "1", "LOCAL_RANK": "1"})  # its rank 1
    assert not leads_launch({"RANK": "8", "LOCAL_RANK": "0", "GROUP_RANK": "1"})  # the second node's first
    assert not leads_launch({"LOCAL_RANK": "1", "NODE_RANK": "0"})  # a child of Lightning's own launcher
    assert not leads_launch({"SLURM_PROCID": "3"})  # srun
    with run_directory_lock("/nonexistent/never/made", env={"LOCAL_RANK": "1"}):
        pass  # the other ranks take no lock (and make nothing)
    assert not Path("/nonexistent").exists()


HOLD = (
    "import sys, time\n"
    "from gpt4llm.training.resume import run_directory_lock\n"
    "lock = run_directory_lock(sys.argv[1])\n"
    "lock.__enter__()\n"
    "print('held', flush=True)\n"
    "time.sleep(300)\n"
)


def hold(run: Path) -> subprocess.Popen:
    """Another process holding `run`'s lock, as a training there does; its command is `python -c ...`."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_a_held_run_directory_stops_a_second_training_naming_the_first_and_a_dead_ones_is_taken_over(tmp_path, caplog):
    run = tmp_path / "run"
    holder = hold(run)
    try:
        started = time.monotonic()
        with pytest.raises(LockHeld) as held:
            with run_directory_lock(run):
                pass
        assert time.monotonic() - started < 1
        message = str(held.value)
        assert message.startswith(f"cannot train in this run directory: {run} is in use by pid {holder.pid} on ")
        assert f"(-c {run}); two trainings in one directory would overwrite each other's" in message
        assert message.endswith(
            f"stop it (kill {holder.pid}), or train elsewhere (another GPT4LLM_RUN_ID or hydra.run.dir)"
        )
    finally:
        holder.kill()
        holder.wait()
    assert json.loads((run / RUN_LOCK).read_text())["pid"] == holder.pid  # SIGKILLed: its note stays
    with caplog.at_level(logging.WARNING, logger="gpt4llm.training.resume"):
        with run_directory_lock(run):
            assert json.loads((run / RUN_LOCK).read_text())["pid"] == os.getpid()
    assert f"took over the run directory's lock from pid {holder.pid} on " in caplog.text
    assert not (run / RUN_LOCK).exists()  # released: a finished run leaves no lock file


def test_train_takes_the_run_directorys_lock_before_anything_else(tmp_path):
    from gpt4llm.train import train

    cfg = compose_train(demo_overrides(tmp_path))
    cfg.paths.output_dir = str(tmp_path / "run")
    holder = hold(tmp_path / "run")
    try:
        # before: it trained, checkpointed and exported into the directory another run was writing
        with pytest.raises(LockHeld, match=f"pid {holder.pid} on "):
            train(cfg)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [RUN_LOCK]


# --- what a resume may change ------------------------------------------------------------------------------------
SETTINGS = {
    "task": "SFTModule",
    "data": {"file": "/data/a.json", "sha256": "a" * 64},
    "data.template": "alpaca",
    "data.val_size": 40,
    "peft.target_modules": ["q_proj", "v_proj"],
    "task.optimizer.lr": 3e-3,
}


def test_a_setting_that_differs_from_the_checkpoints_is_named_with_both_values():
    check_settings(SETTINGS, dict(SETTINGS))
    check_settings(SETTINGS, SETTINGS | {"task.optimizer.lr": 1e-4})  # the learning rate may change
    check_settings(SETTINGS, SETTINGS | {"data": {"file": "/moved/a.json", "sha256": "a" * 64}})  # same bytes
    check_settings(SETTINGS, SETTINGS | {"data.pairing": "all"})  # a setting the checkpoint does not record
    check_settings({}, SETTINGS)  # a checkpoint that records nothing (written before)

    with pytest.raises(CheckpointError) as differs:
        check_settings(SETTINGS, SETTINGS | {"data.template": "chatml"})
    assert str(differs.value) == (
        "ckpt_path: data.template is alpaca in the checkpoint's run, chatml here. A resume trains on as the run "
        "started (README, Sweeps, resume: what may change): pass data.template=alpaca, or start a new run without "
        "ckpt_path"
    )
    with pytest.raises(CheckpointError, match=r"^ckpt_path: peft\.target_modules is \[q_proj,v_proj\] in the "):
        check_settings(SETTINGS, SETTINGS | {"peft.target_modules": "all-linear"})
    with pytest.raises(
        CheckpointError, match=r"^ckpt_path: task is SFTModule in the checkpoint's run, DPOModule here "
    ):
        check_settings(SETTINGS, SETTINGS | {"task": "DPOModule", "data.val_size": 16})
    with pytest.raises(CheckpointError) as other_data:
        check_settings(SETTINGS, SETTINGS | {"data": {"file": "/data/b.json", "sha256": "b" * 64}})
    assert str(other_data.value).startswith(
        "ckpt_path: the checkpoint's run trained on /data/a.json (sha256 aaaaaaaaaaaa), this run reads /data/b.json "
        "(sha256 bbbbbbbbbbbb): other data would skip or repeat samples."
    )
    with pytest.raises(CheckpointError, match=r"\(and 1 more: data\.val_size\)"):
        check_settings(SETTINGS, SETTINGS | {"data.template": "chatml", "data.val_size": 20})


def test_a_new_learning_rate_scales_the_schedule_from_where_it_stands():
    from transformers import get_scheduler

    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}], lr=4e-3)
    scheduler = get_scheduler("cosine", optimizer, 2, 10)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    before = [g["lr"] for g in optimizer.param_groups]

    class Trainer:  # what scale_learning_rate reads of Lightning's
        lr_scheduler_configs = [type("Config", (), {"scheduler": scheduler})()]
        optimizers = [optimizer]

    scale_learning_rate(Trainer(), 0.25)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([lr / 4 for lr in before])
    reference = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    expected = get_scheduler("cosine", reference, 2, 10)
    for _ in range(6):
        reference.step()
        expected.step()
    optimizer.step()
    scheduler.step()  # the schedule goes on as if it had started at 1e-3
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([reference.param_groups[0]["lr"]] * 2)


# --- every epoch its own order, and a checkpoint at an epoch's end ------------------------------------------------
def epochs(sampler, loader_batches: int, batch_size: int, count: int) -> list[list[int]]:
    """What a loader asks of the sampler over `count` epochs, as Lightning drives it: a fresh iterator each epoch,
    and exactly the epoch's batches taken from it (never the one past its end)."""
    taken = []
    for _ in range(count):
        it = iter(sampler)
        taken.append([next(it) for _ in range(loader_batches * batch_size)])
    return taken


@pytest.mark.parametrize(
    "make", [lambda: ShuffledSampler(24, seed=3), lambda: LengthGroupedSampler(list(range(24)), 4, 3)]
)
def test_each_epoch_draws_its_own_order_though_no_one_asks_past_its_end(make):
    first, second, third = epochs(make(), 6, 4, 3)
    sampler = make()
    # before: the generator moved to the next epoch only past its last index, which Lightning never asks for, so
    # every epoch trained in the first one's order
    assert first == sampler.shard(0) and second == sampler.shard(1) and third == sampler.shard(2)
    assert first != second != third


def test_a_position_at_an_epochs_end_is_the_next_epochs_start():
    sampler = ShuffledSampler(24, seed=3)
    assert sampler.state_dict() == {"epoch": 0, "yielded": 0}
    epochs(sampler, 6, 4, 1)
    assert sampler.state_dict() == {"epoch": 1, "yielded": 0}  # before: {"epoch": 0, "yielded": 24}
    resumed = ShuffledSampler(24, seed=3)
    resumed.load_state_dict({"epoch": 0, "yielded": 24})  # as a checkpoint written before said it
    assert list(resumed) == resumed.shard(1)  # before: nothing, an empty epoch
    assert list(resumed) == resumed.shard(2)
    middle = ShuffledSampler(24, seed=3)
    middle.load_state_dict({"epoch": 1, "yielded": 8})
    assert middle.state_dict() == {"epoch": 1, "yielded": 8}
    assert list(middle) == middle.shard(1)[8:]


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_random_states_survive_a_checkpoint_read_with_weights_only(tmp_path):
    seed_all(1)
    torch.save({"states": random_states()}, tmp_path / "rng.pt")
    want = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    seed_all(2)
    set_random_states(torch.load(tmp_path / "rng.pt", weights_only=True)["states"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == want


# --- resumes end to end (in this process) --------------------------------------------------------------------------
def train_in(out: Path, overrides: list[str]) -> Path:
    from gpt4llm.train import train

    cfg = compose_train(overrides)
    cfg.paths.output_dir = str(out)
    out.mkdir(parents=True, exist_ok=True)
    train(cfg)
    return out


def small(task: str, tmp: Path, *extra: str) -> list[str]:
    """8 steps over two epochs of 4 batches (32 training examples or pairs of the demos), fp32, a checkpoint at
    every step, nothing exported."""
    base = rm_overrides(tmp) if task != "sft" else demo_overrides(tmp, "callbacks.exact_match=null")
    return [
        *base,
        *(["task=dpo"] if task == "dpo" else []),
        "data.demo.num_records=48",
        "data.val_size=16",
        "data.batch_size=8",
        "trainer.max_epochs=2",
        "trainer.max_steps=8",
        "trainer.precision=32-true",
        "validate_first=false",
        "callbacks.checkpoint.every_n_train_steps=1",
        "callbacks.checkpoint.save_top_k=-1",
        "export=false",
        *extra,
    ]


LORA_DROPOUT = ("peft=lora", "peft.target_modules=all-linear", "peft.lora_dropout=0.2")


@pytest.mark.slow
@pytest.mark.parametrize("task, extra", [("sft", LORA_DROPOUT), ("rm", ()), ("dpo", LORA_DROPOUT)])
def test_a_resume_is_exact_from_an_epochs_last_batch_and_with_dropout(tmp_path, task, extra):
    args = small(task, tmp_path, *extra)
    straight = train_in(tmp_path / "straight", args)
    last_batch = torch.load(straight / "checkpoints" / "step4.ckpt", weights_only=False)
    assert last_batch["loops"]["fit_loop"]["epoch_loop.batch_progress"]["is_last_batch"]  # epoch 0's last batch
    whole = scalars_by_step(straight)["train/loss"]
    end = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for step in (3, 4):  # mid-epoch (before: other dropout masks), an epoch's last batch (before: an empty epoch)
        resumed = train_in(
            tmp_path / f"from{step}", [*args, f"ckpt_path={straight / 'checkpoints' / f'step{step}.ckpt'}"]
        )
        again = scalars_by_step(resumed)["train/loss"]
        assert sorted(again) == list(range(step, 8)), (step, again)
        # the same batches, and with LoRA dropout the same masks (before: other masks, losses apart by ~1e-3)
        assert {s: whole[s] for s in again} == again, (step, whole, again)
        state = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
        for name, tensor in end.items():
            assert torch.equal(state[name], tensor), f"{name} differs after resuming from step {step}"


@pytest.mark.slow
def test_a_resume_in_its_run_directory_overwrites_last_ckpt(tmp_path):
    args = small("sft", tmp_path, "callbacks.checkpoint.every_n_train_steps=4", "trainer.max_steps=12")
    run = train_in(tmp_path / "run", [*args, "trainer.max_steps=8"])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step4.ckpt", "step8.ckpt"]
    train_in(run, [*args, f"ckpt_path={run / 'checkpoints' / 'step4.ckpt'}", "trainer.max_steps=8"])
    # before: last-v1.ckpt beside the interrupted run's last.ckpt, which then held the older state
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step4.ckpt", "step8.ckpt"]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 8
    assert not (run / RUN_LOCK).exists()


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory) -> tuple[Path, list[str]]:
    """A 6-step SFT run with LoRA over two epochs (checkpoints at steps 3 and 6), and its overrides."""
    tmp = tmp_path_factory.mktemp("checkpointed")
    args = small("sft", tmp, "peft=lora", "trainer.max_steps=6", "callbacks.checkpoint.every_n_train_steps=3")
    return train_in(tmp / "run", args), args


@pytest.mark.slow
@pytest.mark.parametrize(
    "change, named",
    [
        ("data.template=chatml", "data.template is alpaca in the checkpoint's run, chatml here"),
        ("peft.r=4", "peft.r is 8 in the checkpoint's run, 4 here"),
        ("task.lr_scheduler=linear", "task.lr_scheduler is cosine in the checkpoint's run, linear here"),
        ("data.batch_size=4", "data.batch_size is 8 in the checkpoint's run, 4 here"),
        ("trainer.max_steps=10", "trainer.max_steps is 6 in the checkpoint's run, 10 here"),
        ("data.demo.num_records=60", "the checkpoint's run trained on "),
    ],
)
def test_a_resume_with_other_settings_stops_naming_both_values(tmp_path, checkpointed, change, named):
    # before: each went on quietly (another template's tokens on the old embeddings, other data skipping samples)
    run, args = checkpointed
    with pytest.raises(CheckpointError) as stopped:
        train_in(tmp_path / "resumed", [*args, f"ckpt_path={run / 'checkpoints' / 'step3.ckpt'}", change])
    assert named in str(stopped.value) and "\n" not in str(stopped.value)
    assert not list((tmp_path / "resumed").iterdir())


@pytest.mark.slow
def test_a_resume_with_another_learning_rate_goes_on_at_that_rate(tmp_path, checkpointed, caplog):
    run, args = checkpointed
    lr = compose_train(args).task.optimizer.lr
    with caplog.at_level(logging.INFO):
        resumed = train_in(
            tmp_path / "resumed",
            [*args, f"ckpt_path={run / 'checkpoints' / 'step3.ckpt'}", f"task.optimizer.lr={lr / 4}"],
        )
    assert f"task.optimizer.lr={lr / 4:g} on resume (the checkpoint's run had {lr:g})" in caplog.text
    # before: the new rate was written to the config and the checkpoint's schedule went on at the old one
    whole, again = scalars_by_step(run)["train/lr"], scalars_by_step(resumed)["train/lr"]
    assert sorted(again) == [3, 4, 5]
    assert all(again[s] == pytest.approx(whole[s] / 4, rel=1e-6) for s in again), (whole, again)
    last = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["callbacks"]["RecordedSettings"]["settings"]["task.optimizer.lr"] == lr / 4


# --- two trainings at once, as users start them ---------------------------------------------------------------------
@pytest.mark.slow
def test_two_trainings_with_one_run_id_the_second_stops_naming_the_first(tmp_path):
    args = [
        a
        for a in demo_overrides(
            tmp_path,
            f"paths.log_dir={tmp_path / 'logs'}",
            "trainer.max_steps=200",
            "trainer.max_epochs=8",
            "validate_first=false",
            "callbacks.exact_match=null",
            "export=false",
            "+callbacks.slow._target_=helpers.killable.SlowSteps",
            "+callbacks.slow.seconds=0.5",
        )
        if not a.startswith("hydra.run.dir=")
    ]
    env = ENV | {"GPT4LLM_RUN_ID": "shared", "PYTHONPATH": str(ROOT / "tests")}
    run = tmp_path / "logs" / "train" / "runs" / "shared"
    first = subprocess.Popen(
        [sys.executable, "-m", "gpt4llm.train", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not (run / "tensorboard").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, "the first run ended before the second started"
        second = subprocess.run(
            [sys.executable, "-m", "gpt4llm.train", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        # before: both trained into `shared`, and exited 0
        assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith(f"Error: cannot train in this run directory: {run} is in use by pid {first.pid} on ")
        assert f"(python -m gpt4llm.train paths.data_dir={tmp_path / 'data'} " in last
        assert first.poll() is None  # the first goes on
        # the refused launch's config is kept apart: the running one's .hydra/ is its own (before: overwritten)
        saved = OmegaConf.load(run / ".hydra" / "config.yaml")
        assert saved.callbacks.slow.seconds == 0.5
        launches = list((run / ".hydra" / "launches").glob("*/config.yaml"))
        assert len(launches) == 1 and (launches[0].parent / "overrides.yaml").exists()
    finally:
        first.kill()
        first.wait()
    assert (run / RUN_LOCK).exists()  # killed: the lock file stays, held by no one
    third = subprocess.run(
        [sys.executable, "-m", "gpt4llm.train", *args, "trainer.max_steps=2", "callbacks.slow.seconds=0"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"took over the run directory's lock from pid {first.pid} on " in (run / "train.log").read_text()
    assert not (run / RUN_LOCK).exists()
    assert OmegaConf.load(run / ".hydra" / "config.yaml") == saved  # the run's first config, still
    launches = sorted((run / ".hydra" / "launches").glob("*/overrides.yaml"), key=lambda p: p.stat().st_mtime)
    assert len(launches) == 2 and "trainer.max_steps=2" in OmegaConf.load(launches[-1])
