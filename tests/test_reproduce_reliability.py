"""`reproduce`'s runner when things go wrong (issue 28, items 7-11 and 15), on fake stages (tests/helpers/fake_stage.py,
started as the stage's launcher) that take a fraction of a second: deleted or edited outputs, selectors that match
nothing, two runs on one study, a runner killed with SIGKILL, a launcher that cannot start, a damaged stage.json."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt4llm.errors import ConfigError, RecordError, StageFailed
from gpt4llm.io.study_lock import LockHeld, study_lock
from gpt4llm.reproduction import runner
from gpt4llm.reproduction.runner import Pipeline, Stage
from helpers.configs import CONF

FAKE = Path(__file__).parent / "helpers" / "fake_stage.py"
SRC = Path(__file__).parents[1] / "src"


def fake(name: str, *args: str, **kw) -> Stage:
    return Stage(name, "fake", list(args), launcher=kw.pop("launcher", [sys.executable, str(FAKE)]), **kw)


def study() -> list[Stage]:
    return [
        fake("evaluate/rouge", "write=rouge_lenALL.json", "text=[0.3]", outputs=["rouge_lenALL.json"]),
        fake("plots", "write=figure.png", needs=["evaluate/rouge"]),
    ]


def run(root: Path, stages: list[Stage], **kw) -> dict[str, tuple[str, str]]:
    outcomes = Pipeline(root, stages, echo=lambda line: None, **kw).run()
    return {o.stage.name: (str(o.status), o.reason) for o in outcomes}


# --- 7: a stage is reused only while the files its stage.json records are there as they were ---------------------
def test_a_stage_whose_outputs_were_deleted_or_edited_is_redone_and_says_why(tmp_path):
    root = tmp_path / "study"
    run(root, study())
    record = json.loads((root / "evaluate" / "rouge" / "stage.json").read_text())
    assert record["files"]["rouge_lenALL.json"] == "sha256:" + runner.file_digest(
        root / "evaluate" / "rouge" / "rouge_lenALL.json", "sha256"
    )
    assert set(record["files"]) == {"rouge_lenALL.json", "stage.log"}  # every file it left but stage.json

    (root / "evaluate" / "rouge" / "rouge_lenALL.json").unlink()
    # before: "reused", and the report showed "—" for the deleted table
    assert run(root, study())["evaluate/rouge"] == (
        "ran",
        "its outputs changed since it ran: evaluate/rouge/rouge_lenALL.json is missing",
    )
    assert (root / "evaluate" / "rouge" / "rouge_lenALL.json").read_text() == "[0.3]"

    (root / "plots" / "figure.png").write_text("edited")
    assert run(root, study()) == {
        "evaluate/rouge": (
            "reused",
            f"unchanged since {json.loads((root / 'evaluate/rouge/stage.json').read_text())['finished']}",
        ),
        "plots": ("ran", "its outputs changed since it ran: plots/figure.png changed"),
    }


def test_a_stage_not_selected_whose_outputs_are_gone_is_not_done(tmp_path):
    root = tmp_path / "study"
    run(root, study())
    (root / "evaluate" / "rouge" / "rouge_lenALL.json").unlink()
    with pytest.raises(StageFailed, match="stage plots needs evaluate/rouge, which has not run") as failed:
        run(root, study(), only=["plots"])
    assert failed.value.outcomes[0].reason == (
        "not selected, and its outputs changed since it ran: evaluate/rouge/rouge_lenALL.json is missing"
    )


def test_big_files_are_recorded_by_size_and_modification_time(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "DIGEST_UP_TO", 3)  # "[0.3]" is 5 bytes: a checkpoint, as far as the runner knows
    root = tmp_path / "study"
    run(root, study())
    table = root / "evaluate" / "rouge" / "rouge_lenALL.json"
    seal = json.loads((root / "evaluate" / "rouge" / "stage.json").read_text())["files"]["rouge_lenALL.json"]
    assert seal == f"size 5, modified {table.stat().st_mtime_ns}"
    os.utime(table, ns=(table.stat().st_atime_ns, table.stat().st_mtime_ns - 10**9))  # rewritten: a new time
    assert run(root, study())["evaluate/rouge"] == (
        "ran",
        "its outputs changed since it ran: evaluate/rouge/rouge_lenALL.json changed",
    )


def test_a_stage_json_from_before_files_were_recorded_is_checked_by_its_declared_outputs(tmp_path):
    root = tmp_path / "study"
    run(root, study())
    record_path = root / "evaluate" / "rouge" / "stage.json"
    record = json.loads(record_path.read_text())
    del record["files"]
    record_path.write_text(json.dumps(record))
    assert run(root, study())["evaluate/rouge"][0] == "reused"
    (root / "evaluate" / "rouge" / "rouge_lenALL.json").unlink()
    assert run(root, study())["evaluate/rouge"][0] == "ran"


# --- 8: a selector that matches nothing is an error; a bare string is one stage's name -------------------------------
@pytest.mark.parametrize(
    "selectors, message",
    [
        (
            {"only": ["nonexistent/*"]},
            r"^stages=\[nonexistent/\*\] matches no stage; the stages: evaluate/rouge, plots ",
        ),
        ({"force": ["bogus"]}, r"^force=\[bogus\] matches no stage; the stages: evaluate/rouge, plots "),
        ({"only": "nonexistent"}, r"^stages=\[nonexistent\] matches no stage"),
        ({"only": ["plots"], "force": ["evaluate/*"]}, r"^force=\[evaluate/\*\] names no stage that stages="),
    ],
)
def test_selectors_that_match_nothing_are_errors_listing_the_stages(tmp_path, selectors, message):
    with pytest.raises(ConfigError, match=message):
        Pipeline(tmp_path, study(), echo=lambda line: None, **selectors)
    assert not tmp_path.joinpath("evaluate").exists()


def test_a_bare_string_is_one_stage_name_not_its_letters(tmp_path):
    root = tmp_path / "study"
    run(root, study())
    assert [s for s, _ in run(root, study(), force="plots").values()] == ["reused", "ran"]  # was: nothing forced
    assert [s for s, _ in run(root, study(), only="plots").values()] == ["not selected", "reused"]  # was: none


def compose_reproduce(tmp_path: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose(
            "reproduce",
            overrides=[
                "preset=tiny",
                f"out={tmp_path / 'study'}",
                f"paths.data_dir={tmp_path / 'data'}",
                f"paths.log_dir={tmp_path / 'logs'}",
                f"paths.output_dir={tmp_path / 'session'}",  # Hydra's run directory, which compose does not make
                *overrides,
            ],
        )


def test_the_command_takes_a_bare_stages_string_as_one_stage(tmp_path):
    from gpt4llm.reproduce import reproduce

    # plots alone needs evaluate/rouge, never run: before, stages=plots selected nothing and ended with exit 0
    with pytest.raises(StageFailed, match="stage plots needs evaluate/rouge, which has not run"):
        reproduce(compose_reproduce(tmp_path, "stages=plots"))
    with pytest.raises(
        ConfigError, match=r"stages=\[nonexistent/\*\] matches no stage; the stages: train/LLaMA-GPT4, "
    ):
        reproduce(compose_reproduce(tmp_path, "stages=[nonexistent/*]"))


# --- 9: one run per study at a time --------------------------------------------------------------------------------
HOLD = (
    "import sys, time\n"
    "from gpt4llm.io.study_lock import study_lock\n"
    "lock = study_lock(sys.argv[1], 'reproduce.lock', command='python -m gpt4llm.reproduce force=[bestofn]')\n"
    "lock.__enter__()\n"
    "print('held', flush=True)\n"
    "time.sleep(120)\n"
)


def hold(path: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path.parent)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_a_second_run_stops_at_once_naming_the_first_and_a_dead_ones_lock_is_taken_over(tmp_path):
    path = tmp_path / "study" / "reproduce.lock"
    holder = hold(path)
    try:
        started = time.monotonic()
        with pytest.raises(LockHeld) as locked:
            with study_lock(path.parent, "reproduce.lock", "run reproduce", "second"):
                pass
        assert time.monotonic() - started < 1
        assert str(locked.value).startswith(
            f"cannot run reproduce: {path.parent} is in use by pid {holder.pid} on {socket.gethostname()}, started 20"
        )
        assert "(python -m gpt4llm.reproduce force=[bestofn]); wait for it to end or stop it" in str(locked.value)
    finally:
        holder.kill()
        holder.wait()
    # its holder died by SIGKILL: the lock is free, its note left behind
    with study_lock(path.parent, "reproduce.lock", command="third") as stale:
        assert stale["pid"] == holder.pid and json.loads(path.read_text())["command"] == "third"
    with study_lock(path.parent, "reproduce.lock", command="fourth") as stale:
        assert stale == {}  # the third ended cleanly


def test_reproduce_takes_the_studys_lock(tmp_path):
    from gpt4llm.reproduce import reproduce

    holder = hold(tmp_path / "study" / "reproduce.lock")
    try:  # before: the second run went on (here into "plots needs evaluate/rouge")
        with pytest.raises(LockHeld, match=f"pid {holder.pid} on "):
            reproduce(compose_reproduce(tmp_path, "stages=[plots]"))
    finally:
        holder.kill()
        holder.wait()


# --- 10: stage processes die with the runner -----------------------------------------------------------------------
RUNNER = (
    "import sys\n"
    "from gpt4llm.reproduction.runner import Pipeline, Stage\n"
    "stage = Stage('train/a', 'fake', ['sleep=60', 'pid=' + sys.argv[2]], launcher=[sys.executable, sys.argv[3]])\n"
    "Pipeline(sys.argv[1], [stage]).run()\n"
)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has stopped; only its parent's wait is missing


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_stage_dies_with_a_runner_killed_by_sigkill(tmp_path):
    pid_file = tmp_path / "stage.pid"
    runner_process = subprocess.Popen([sys.executable, "-c", RUNNER, str(tmp_path / "study"), str(pid_file), str(FAKE)])
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and runner_process.poll() is None
        time.sleep(0.05)
    stage_pid = int(pid_file.read_text())
    try:
        runner_process.kill()  # SIGKILL: no handler, no finally runs in the runner
        runner_process.wait()
        deadline = time.monotonic() + 10
        while alive(stage_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(stage_pid)  # before: it lived on, re-parented, writing into train/a for its 60 s
    finally:
        if alive(stage_pid):
            os.kill(stage_pid, signal.SIGKILL)


# --- 11: a launcher that cannot start removes nothing ---------------------------------------------------------------
def test_a_missing_launcher_is_refused_before_anything_is_touched(tmp_path):
    root = tmp_path / "study"
    run(root, study())
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    redo = [fake("evaluate/rouge", "text=new", outputs=["rouge_lenALL.json"], launcher=["nosuchlauncher"])]
    # before: the done stage was emptied, then "No such file or directory: 'nosuchlauncher'"
    with pytest.raises(ConfigError, match=r"^launcher=\['nosuchlauncher'\]: no program 'nosuchlauncher' here"):
        run(root, redo)
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    # a stage it would only reuse does not need it (the report can be made where the launcher is not)
    reuse = [fake("evaluate/rouge", "write=rouge_lenALL.json", "text=[0.3]", launcher=["nosuchlauncher"])]
    assert run(root, reuse)["evaluate/rouge"][0] == "reused"
    # a stage never done is checked before any stage runs
    fresh = [study()[0], fake("plots", needs=["evaluate/rouge"], launcher=["nosuchlauncher"])]
    with pytest.raises(ConfigError, match="no program 'nosuchlauncher' here"):
        run(tmp_path / "fresh", fresh)
    assert not (tmp_path / "fresh").exists()


def test_a_launcher_that_fails_to_start_gives_back_the_done_stage(tmp_path):
    root = tmp_path / "study"
    run(root, study())
    broken = tmp_path / "launcher"  # it is there and executable, but its interpreter is not
    broken.write_text("#!/nonexistent/interpreter\n")
    broken.chmod(0o755)
    stages = [fake("evaluate/rouge", "write=rouge_lenALL.json", outputs=["rouge_lenALL.json"], launcher=[str(broken)])]
    with pytest.raises(StageFailed, match=f"^stage evaluate/rouge could not start '{broken}': No such file"):
        run(root, stages, force=["evaluate/rouge"])
    assert (root / "evaluate" / "rouge" / "rouge_lenALL.json").read_text() == "[0.3]"
    assert json.loads((root / "evaluate" / "rouge" / "stage.json").read_text())["stage"] == "evaluate/rouge"
    assert sorted(p.name for p in (root / "evaluate").iterdir()) == ["rouge"]  # nothing left aside


# --- 15: a damaged stage.json names itself, and force= redoes its stage -------------------------------------------
def test_a_truncated_stage_json_is_named_and_force_redoes_the_stage(tmp_path):
    root = tmp_path / "study"
    run(root, study())
    record = root / "evaluate" / "rouge" / "stage.json"
    record.write_text(record.read_text()[:20])
    with pytest.raises(RecordError, match=f"^{record} cannot be read .*redo the stage with force=\\[evaluate/rouge\\]"):
        run(root, study())
    assert (root / "evaluate" / "rouge" / "rouge_lenALL.json").exists()  # refused before anything was touched
    assert run(root, study(), force=["evaluate/rouge"])["evaluate/rouge"] == (
        "ran",
        "forced (force=['evaluate/rouge'])",
    )
    assert json.loads(record.read_text())["stage"] == "evaluate/rouge"
