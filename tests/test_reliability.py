"""Nothing lost, nothing silent: exact resume after a kill, settings checked at start, a directory per run, failed
requests not passed off as results, writes that appear whole or not at all, and errors that say what to do."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt4llm.app.checks import check_values
from gpt4llm.errors import ConfigError, RecordError
from gpt4llm.io import atomic
from gpt4llm.io.json_files import read_json_records
from helpers.configs import ROOT, TINY_OVERRIDES, compose_train
from helpers.runs import run_cli, scalars_by_step

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def losses_by_step(run: Path) -> dict[int, float]:
    return scalars_by_step(run)["train/loss"]  # as TensorBoard reads them: purge_step honoured


# --- 1. resume ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("batching", ["packed", "random", "grouped"])
def test_a_killed_run_resumes_exactly_across_epoch_boundaries(tmp_path, batching):
    # 200 training examples in batches of 8: 25 steps an epoch, so steps 20 -> 60 cross two epoch boundaries.
    common = [
        *TINY_OVERRIDES,
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        "data.demo.num_records=240",
        "data.val_size=40",
        "data.batch_size=8",
        f"data.batching={batching}",
        "trainer.max_epochs=3",
        "trainer.max_steps=60",
        "trainer.log_every_n_steps=1",
        "validate_first=false",
        "callbacks.exact_match=null",
        "callbacks.checkpoint.every_n_train_steps=20",
        "callbacks.checkpoint.save_top_k=-1",
        "export=false",
        "+logger.tensorboard.max_queue=1",  # every event on disk at once, as a kill would find it
    ]
    run_cli("gpt4llm.train", [*common, f"hydra.run.dir={tmp_path / 'straight'}"], cwd=tmp_path)
    killed = tmp_path / "logs" / "train" / "runs" / "killed"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpt4llm.train",
            *common,
            f"hydra.run.dir={killed}",
            "+callbacks.die._target_=helpers.killable.DieAt",
            "+callbacks.die.step=33",
        ],
        cwd=tmp_path,
        env=ENV | {"PYTHONPATH": str(ROOT / "tests")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert max(losses_by_step(killed)) >= 30  # it had logged past its last checkpoint (step 20) when it died

    # No hydra.run.dir: a resumed run goes on in its checkpoint's run directory.
    resumed = run_cli("gpt4llm.train", [*common, f"ckpt_path={killed / 'checkpoints' / 'step20.ckpt'}"], cwd=tmp_path)
    assert f"Run directory: {killed}" in resumed.stdout
    straight, after = losses_by_step(tmp_path / "straight"), losses_by_step(killed)
    assert sorted(after) == sorted(straight) == list(range(60))  # steps 20-32 once, not twice
    assert after == straight  # identical, step by step


# --- 2. settings ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, message",
    [
        ("data.val_size=-5", r"data\.val_size=-5: must be a whole number >= 0"),
        ("data.batch_size=0", r"data\.batch_size=0: must be a whole number >= 1"),
        ("model.max_length=0", r"model\.max_length=0: must be a whole number >= 1"),
        ("task.optimizer.lr=-0.001", r"task\.optimizer\.lr=-0\.001: must be > 0"),
        ("task.warmup_ratio=1.5", r"task\.warmup_ratio=1\.5: must be between 0 and 1"),
        ("data.val_size=2.5", r"data\.val_size=2\.5: must be a whole number"),
    ],
)
def test_settings_out_of_range_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        check_values(compose_train([override]))


@pytest.mark.slow  # a command run as a subprocess (README, the test tiers)
def test_a_bad_setting_stops_at_start_in_one_line_and_leaves_no_run_directory(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "gpt4llm.train", "task.optimizer.lr=-1", f"paths.log_dir={tmp_path / 'logs'}"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == "Error: task.optimizer.lr=-1: must be > 0"
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "logs").rglob("runs/*")), "an empty run directory was left behind"


# --- 3. a directory per run ---------------------------------------------------------------------------------------
@pytest.mark.slow  # a command run as a subprocess (README, the test tiers)
def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "gpt4llm.plan"],
            cwd=tmp_path,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(2)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    runs = list((tmp_path / "logs" / "plan" / "runs").iterdir())
    assert len(runs) == 2 and all((r / "plan.json").exists() for r in runs)


# --- 4. failed requests ---------------------------------------------------------------------------------------------
def test_mostly_failed_requests_fail_the_run_and_empty_replies_are_asked_again(tmp_path, monkeypatch):
    import gpt4llm.synthesize as S
    from gpt4llm.errors import TooFewSucceeded
    from helpers.configs import synth_cfg
    from helpers.fake_servers import ChatServer
    from helpers.runs import write

    monkeypatch.setenv("TEACHER_KEY", "k")
    server = ChatServer(reply=lambda request: "")  # answers, but empty
    try:
        seed = write(tmp_path / "seed.json", [{"instruction": f"Say {i}.", "input": ""} for i in range(3)])
        cfg = synth_cfg(tmp_path, server.base_url, "job=answer", f"instructions={seed}")
        with pytest.raises(TooFewSucceeded, match="only 0 of 3 records succeeded"):
            S.synthesize(cfg)
        first = len(server.requests)
        assert first == 3 * 3  # each asked once and again twice
        with pytest.raises(TooFewSucceeded):
            S.synthesize(cfg)
        assert len(server.requests) == 2 * first, "an empty reply was cached: the rerun did not ask again"
    finally:
        server.close()


# --- 5, 6, 7. writes ------------------------------------------------------------------------------------------------
def test_tokenizer_workers_end_with_their_parent():
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(_death_signal_in_worker) == 15  # SIGTERM when the parent dies


def _death_signal_in_worker() -> int:
    import ctypes

    from gpt4llm.data.cache import DiesWithParent

    wrapped = DiesWithParent(lambda: None)
    wrapped.parent = os.getppid()  # as if made in the parent
    wrapped()
    signal = ctypes.c_int()
    ctypes.CDLL("libc.so.6").prctl(2, ctypes.byref(signal))  # PR_GET_PDEATHSIG
    return signal.value


def test_temporaries_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    (tmp_path / f"export.tmp-{dead}").mkdir()
    (tmp_path / f"export.tmp-{dead}" / "model.safetensors").write_bytes(b"0" * 100)
    (tmp_path / f"data.json.part-{dead}").write_text("[")
    alive = tmp_path / f"other.tmp-{os.getppid()}"  # a writer still at work
    alive.write_text("")
    atomic.write_text(tmp_path / "report.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["report.json", alive.name])


def test_a_full_disk_names_the_path_and_what_to_do(tmp_path, monkeypatch):
    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", full)
    with pytest.raises(atomic.WriteError, match=rf"could not write {tmp_path / 'out.json'}: the disk is full"):
        atomic.write_text(tmp_path / "out.json", "{}")
    assert list(tmp_path.iterdir()) == []  # and no temporary left


@pytest.mark.slow  # a command run as a subprocess (README, the test tiers)
def test_prepare_outputs_appear_together(tmp_path):
    from helpers.configs import demo_overrides

    run_cli("gpt4llm.prepare", demo_overrides(tmp_path), cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / "run" / "prepared").iterdir()) == [
        "report.json",
        "train.jsonl",
        "validation.jsonl",
    ]
    assert not [p for p in (tmp_path / "run").iterdir() if ".tmp-" in p.name]


# --- 8. unclear errors ----------------------------------------------------------------------------------------------
def test_records_errors_say_where_and_why(tmp_path, tokenizer):
    from gpt4llm.data.cache import SplitSettings
    from gpt4llm.data.records import load_instruction_records
    from gpt4llm.data.sft_datamodule import build_sft_splits

    with pytest.raises(RecordError, match="a directory, not a records file"):
        read_json_records(tmp_path)
    garbage = tmp_path / "garbage.json"
    garbage.write_text('[\n  {"instruction": "a", "output": "b"}\n]\n]garbage\n')
    with pytest.raises(RecordError, match=r"line 4, column 1: text after the list's end"):
        read_json_records(garbage)

    copies = tmp_path / "copies.json"
    copies.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "hi"}] * 300))
    with pytest.raises(RecordError, match=r"1 usable of 300 records; skipped: \{'duplicate record': 299\}"):
        build_sft_splits(copies, tokenizer, SplitSettings(max_length=64, val_size=20), tmp_path / "cache")

    broken = tmp_path / "surrogate.json"
    broken.write_text('[{"instruction": "a\\ud800", "output": "b"}, {"instruction": "c", "output": "d"}]')
    with pytest.raises(RecordError, match=r"record 0: field 'instruction' holds a lone surrogate at character 1"):
        load_instruction_records(broken)
    records, report = load_instruction_records(broken, skip_invalid=True)
    assert [r["index"] for r in records] == [1] and report.skipped


@pytest.mark.slow
def test_resuming_with_another_model_says_so(tmp_path):
    from helpers.configs import demo_overrides

    args = demo_overrides(
        tmp_path, "trainer.max_steps=2", "validate_first=false", "export=false", "callbacks.exact_match=null"
    )
    run_cli("gpt4llm.train", args, cwd=tmp_path)
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 2
    other = [a for a in args if not a.startswith(("model.tiny.hidden_size", "hydra.run.dir"))]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpt4llm.train",
            *other,
            "model.tiny.hidden_size=96",
            f"ckpt_path={checkpoint}",
            f"hydra.run.dir={tmp_path / 'other'}",
            "model.path=" + str(tmp_path / "data" / "models" / "tiny-96"),
        ],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("Error: ckpt_path: the checkpoint is for another model (model.") and "is [" in message, (
        message
    )
