"""A small stage runner: each stage is one of our commands (`python -m gpt4llm.<command> <overrides>`) run in a
directory of its own, `<root>/<stage name>/`, and is done when that directory holds `stage.json`, written last.

- Cached: a stage's fingerprint is the digest of its command, the fingerprints of the stages it reads, the content of
  the outside files it reads, and our version. A rerun reuses a stage whose fingerprint is unchanged and whose files
  (each recorded in its stage.json) are all still there as they were; it redoes the rest, saying why (a new try starts
  in an empty directory, so nothing half-written is ever read: a directory without stage.json is never used). The
  last run's outputs are moved aside, not deleted, until the new try has started, so a launcher that cannot start
  loses nothing.
- Checked before anything runs: every stages=/force= pattern matches a stage, every launcher is a program here, every
  stage.json to be read is readable.
- Stage processes die with the runner: each runs in a process group of its own that the runner ends when it stops,
  and on Linux gets SIGTERM when the runner dies, even by SIGKILL (prctl's parent-death signal).
- Failures stop the run with the stage's name, exit status, log and last lines; earlier stages keep what they made.
- Progress: "[n/N] stage: ..." with an ETA only once every stage left has a measured duration: its own last time, or
  this run's stages of its kind (train, generate, judge ...: a training stage says nothing of a plot's time).

Why not DVC or Hydra's multirun: DVC wants the project to be a git + DVC repository and its own dvc.yaml beside our
Hydra configs (two sources of truth for one command line); Hydra's multirun runs independent jobs of one command, not
a chain of different commands that read each other's outputs. What is needed here (fingerprints, a done-marker, an
order) is a hundred lines.
"""

from __future__ import annotations

import ctypes
import fnmatch
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

from gpt4llm.data.sources import file_digest
from gpt4llm.errors import ConfigError, GPT4LLMError, RecordError, StageFailed
from gpt4llm.io.atomic import remove_stale_temporaries
from gpt4llm.io.json_files import write_json

DONE = "stage.json"
LOG = "stage.log"
# A stage's files are recorded by sha256 up to this size, and by size and modification time above it: hashing a 7B
# model's 13 GB export or its checkpoints on every rerun would take minutes. Deleting or rewriting such a file (or
# copying the study without keeping times: cp -p, rsync -a do) redoes its stage; a same-size edit that keeps the
# time does not, which is the price of not reading it.
DIGEST_UP_TO = 64 * 2**20


class Status(str, Enum):
    """What became of a stage in one run: the runner sets it, the report shows it (compares equal to its value)."""

    RAN = "ran"
    REUSED = "reused"  # done before with the same fingerprint
    SKIPPED = "skipped"  # cannot run here (no judge key), or needs a stage that did not run
    NOT_SELECTED = "not selected"  # outside stages=[...]
    FAILED = "failed"  # its command failed or its inputs could not be had; the run stopped there

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


@dataclass
class Stage:
    name: str  # also its directory under the root: train/LLaMA-GPT4
    module: str  # gpt4llm.train
    args: list[str]  # the command's Hydra overrides (the run directory is added)
    needs: list[str] = field(default_factory=list)  # the stages whose outputs it reads
    after: list[str] = field(default_factory=list)  # stages it reads when they ran (a skipped one does not block it)
    inputs: list[str] = field(default_factory=list)  # outside files whose content it reads
    downloads: dict[str, dict] = field(default_factory=dict)  # input path -> {url, checksum}: fetched when it runs
    outputs: list[str] = field(default_factory=list)  # what its directory must hold when it succeeds
    launcher: list[str] | None = None  # the multi-node prefix (srun, torchrun ...) for training stages
    skip: str | None = None  # why it does not run (no judge key): said in the report
    runtime_args: Callable[[], list[str]] | None = None  # settings known only when it runs (a served judge's URL)


@dataclass
class Outcome:
    stage: Stage
    status: Status
    reason: str = ""
    seconds: float | None = None
    command: str = ""
    fingerprint: str = ""


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("gpt4llm")
    except PackageNotFoundError:
        return "unknown"


class Pipeline:
    def __init__(
        self,
        root: str | Path,
        stages: list[Stage],
        force: list[str] = (),
        only: list[str] | None = None,
        echo: Callable[[str], None] = print,
    ):
        self.root = Path(root)
        self.stages = stages
        self.force, self.only = _names(force) or [], _names(only) or None
        self.echo = echo
        self.fingerprints: dict[str, str] = {}
        self.durations: dict[str, list[float]] = {}  # kind -> seconds of the stages this invocation ran, for the ETA
        names = [s.name for s in stages]
        for stage in stages:
            unknown = [n for n in stage.needs + stage.after if n not in names[: names.index(stage.name)]]
            if unknown:
                raise ConfigError(f"stage {stage.name} needs {unknown}, which do not come before it")
        for key, patterns in (("stages", self.only or []), ("force", self.force)):
            unmatched = [p for p in patterns if not fnmatch.filter(names, p)]
            if unmatched:
                raise ConfigError(
                    f"{key}=[{','.join(unmatched)}] matches no stage; the stages: {', '.join(names)} "
                    f"(patterns such as generate/* match several)"
                )
        outside = [p for p in self.force if not any(self.selected(s) for s in stages if fnmatch.fnmatch(s.name, p))]
        if outside:
            raise ConfigError(
                f"force=[{','.join(outside)}] names no stage that stages={self.only} selects: add it to stages=[...]"
            )

    def directory(self, stage: Stage) -> Path:
        return self.root / stage.name

    def record(self, stage: Stage) -> dict[str, Any] | None:
        """The stage's stage.json, None if it has none; a RecordError naming the file if it cannot be read."""
        path = self.directory(stage) / DONE
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as err:  # truncated, edited, not UTF-8, unreadable
            raise RecordError(
                f"{path} cannot be read ({err}): redo the stage with force=[{stage.name}] or delete {path.parent}"
            ) from None
        if not isinstance(record, dict):
            raise RecordError(
                f"{path} is not a stage record (a JSON object): redo the stage with force=[{stage.name}] or delete "
                f"{path.parent}"
            )
        return record

    def files(self, stage: Stage) -> dict[str, str]:
        """Every file the stage left in its directory (not stage.json, not another stage's directory inside it),
        relative path -> seal (see DIGEST_UP_TO)."""
        directory = self.directory(stage)
        others = [self.directory(s) for s in self.stages if s is not stage]
        return {
            path.relative_to(directory).as_posix(): _seal(path)
            for path in sorted(directory.rglob("*"))
            if path.is_file() and path.name != DONE and not any(o in path.parents for o in others)
        }

    def changed(self, stage: Stage, record: dict[str, Any]) -> str:
        """Why the stage's recorded files no longer stand for it ("" while every one is there as it was)."""
        directory = self.directory(stage)
        recorded = record.get("files")
        if recorded is None:  # a stage.json from before files were recorded: its declared outputs must be there
            recorded = {name: None for name in record.get("outputs", stage.outputs)}
        problems = []
        for name, seal in recorded.items():
            path = directory / name
            if not path.exists():
                problems.append(f"{stage.name}/{name} is missing")
            elif seal is not None and (not path.is_file() or _seal(path) != seal):
                problems.append(f"{stage.name}/{name} changed")
        if not problems:
            return ""
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        return f"its outputs changed since it ran: {', '.join(problems[:3])}{more}"

    def check_before_running(self) -> None:
        """What would fail a stage after earlier ones ran, refused before anything runs: a stage.json that cannot be
        read, a launcher that is not here for a stage that will run for certain (forced or never done; whether a done
        one is redone is known only as the run goes: check_launcher again before each)."""
        for stage in self.stages:
            if self.selected(stage) and not stage.skip:
                if self.forced(stage) or self.record(stage) is None:
                    self.check_launcher(stage)

    def check_launcher(self, stage: Stage) -> None:
        program = (stage.launcher or [sys.executable])[0]
        if shutil.which(program) is None:
            raise ConfigError(
                f"launcher={stage.launcher}: no program {program!r} here (not on PATH, or not executable); stage "
                f"{stage.name} needs it. Nothing of it was removed"
            )

    def missing_inputs(self, stage: Stage) -> list[str]:
        return [p for p in stage.inputs if not Path(p).is_file()]

    def fetch_inputs(self, stage: Stage) -> None:
        """The stage's outside files, downloaded now where they are missing and have a URL (never while the study is
        planned); a StageFailed naming the path and what to do where one cannot be had."""
        from gpt4llm.data.sources import ensure_file

        for path in self.missing_inputs(stage):
            source = stage.downloads.get(path) or {}
            try:
                ensure_file(path, source.get("url"), checksum=source.get("checksum"))
            except (GPT4LLMError, OSError) as err:
                raise StageFailed(
                    f"stage {stage.name}: its input {path} is missing and could not be had ({err}); "
                    f"copy the file there, or point the preset at a copy"
                ) from None

    def fingerprint(self, stage: Stage) -> str | None:
        """The digest of what decides the stage's outputs; None while an outside file it reads is missing."""
        if self.missing_inputs(stage):
            return None
        content = {
            "module": stage.module,
            "args": stage.args,
            "version": version(),
            "needs": {n: self.fingerprints.get(n) for n in stage.needs + stage.after},
            "inputs": {str(p): file_digest(Path(p), "sha256") for p in stage.inputs},
            "launcher": bool(stage.launcher),
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:20]

    def selected(self, stage: Stage) -> bool:
        return self.only is None or any(fnmatch.fnmatch(stage.name, p) for p in self.only)

    def forced(self, stage: Stage) -> bool:
        return any(fnmatch.fnmatch(stage.name, p) for p in self.force)

    def run(self) -> list[Outcome]:
        """Every stage's outcome, in order. A failed stage stops the run: its StageFailed carries the outcomes so far
        (`.outcomes`, the failed one last), so the report can still be written."""
        self.check_before_running()
        outcomes: list[Outcome] = []
        by_name: dict[str, Outcome] = {}
        started_all = time.monotonic()
        for index, stage in enumerate(self.stages, 1):
            where = f"[{index}/{len(self.stages)}] {stage.name}"
            try:
                outcome = self.run_stage(stage, index, by_name)
            except StageFailed as err:
                outcomes.append(Outcome(stage, Status.FAILED, str(err).splitlines()[0]))
                err.outcomes = outcomes
                raise
            by_name[stage.name] = outcome
            outcomes.append(outcome)
            if outcome.status != Status.RAN:
                self.echo(f"{where}: {outcome.status}{': ' + outcome.reason if outcome.reason else ''}")
        self.echo(f"All {len(self.stages)} stages in {_duration(time.monotonic() - started_all)}")
        return outcomes

    def run_stage(self, stage: Stage, index: int, by_name: dict[str, Outcome]) -> Outcome:
        blocked = [n for n in stage.needs if by_name[n].status in (Status.SKIPPED, Status.FAILED)]
        unfinished = [n for n in stage.needs if by_name[n].status == Status.NOT_SELECTED and not by_name[n].fingerprint]
        if stage.skip or blocked:
            return Outcome(stage, Status.SKIPPED, stage.skip or f"it needs {', '.join(blocked)}, which did not run")
        if not self.selected(stage):
            fp = None if unfinished else self.fingerprint(stage)
            if fp:
                self.fingerprints[stage.name] = fp
            try:
                record = self.record(stage)
            except RecordError as err:
                return Outcome(stage, Status.NOT_SELECTED, f"not selected, and {err}")
            why = "not done with these settings"
            if fp is not None and record is not None and record.get("fingerprint") == fp:
                why = self.changed(stage, record)
            if why:
                return Outcome(stage, Status.NOT_SELECTED, f"not selected, and {why}")
            return Outcome(stage, Status.NOT_SELECTED, "", record.get("seconds"), record.get("command", ""), fp)
        if unfinished:
            raise StageFailed(
                f"stage {stage.name} needs {', '.join(unfinished)}, which has not run with these "
                f"settings: select it too (stages=[...]) or run without stages="
            )
        self.fetch_inputs(stage)
        fp = self.fingerprint(stage)
        self.fingerprints[stage.name] = fp
        if self.forced(stage):
            why = f"forced (force={self.force})"
        else:
            record = self.record(stage)
            if record is None:
                why = "not done before"
            elif record.get("fingerprint") != fp:
                why = "its settings or inputs changed"
            else:
                why = self.changed(stage, record)
                if not why:
                    return Outcome(
                        stage,
                        Status.REUSED,
                        f"unchanged since {record.get('finished')}",
                        record.get("seconds"),
                        record.get("command", ""),
                        fp,
                    )
        self.check_launcher(stage)  # before its last outputs are moved aside
        self.echo(f"[{index}/{len(self.stages)}] {stage.name}: running ({why}){self.eta(index)}")
        return self.execute(stage, fp, why)

    def eta(self, index: int) -> str:
        """An ETA only where every stage left that will run has a measured duration: its own last time (its
        stage.json, even a stale one), else the mean of this run's stages of its kind. Stages differ too much (a
        training run against a plot) for one mean over all of them to be an estimate; until then, the time so far."""
        left = [s for s in self.stages[index - 1 :] if self.selected(s) and not s.skip]
        estimates = [self.estimate(s) for s in left]
        done = [seconds for kind in self.durations.values() for seconds in kind]
        if all(e is not None for e in estimates):
            return (
                f" (ETA about {_duration(sum(estimates))}: {_count(len(left), 'stage')} left, "
                f"timed by their last run or this run's stages of their kind)"
            )
        if done:
            so_far = f"the {_count(len(done), 'stage')} run so far took {_duration(sum(done))}"
            return (
                f" ({_count(len(left), 'stage')} left; {so_far}; no ETA until each kind of stage left has been timed)"
            )
        return ""

    def estimate(self, stage: Stage) -> float | None:
        try:
            record = self.record(stage)
        except RecordError:  # a forced stage's damaged stage.json: no last time to go by
            record = None
        if record and record.get("seconds") is not None:
            return record["seconds"]
        same_kind = self.durations.get(_kind(stage))
        return sum(same_kind) / len(same_kind) if same_kind else None

    def execute(self, stage: Stage, fingerprint: str, reason: str) -> Outcome:
        directory = self.directory(stage)
        args = [*stage.args, *(stage.runtime_args() if stage.runtime_args else [])]
        command = [*(stage.launcher or [sys.executable]), "-m", stage.module, *args, f"hydra.run.dir={directory}"]
        shown = " ".join(command[1:] if not stage.launcher else command)
        env = dict(os.environ, TOKENIZERS_PARALLELISM=os.environ.get("TOKENIZERS_PARALLELISM", "false"))
        if (
            stage.launcher
        ):  # every rank the launcher starts writes to this one directory (training.hardware.check_launch)
            env["GPT4LLM_RUN_ID"] = f"{stage.name.replace('/', '_')}_{fingerprint}"
        # The last run's outputs wait beside the directory (".tmp-<pid>": what a runner killed meanwhile left there is
        # removed by the next one) until the new try has started; the new try starts empty.
        remove_stale_temporaries(directory.parent)
        previous = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
        if directory.exists():
            os.replace(directory, previous)
        directory.mkdir(parents=True)
        started = time.monotonic()
        with (directory / LOG).open("w") as log:
            log.write(f"$ {shown}\n")
            log.flush()
            try:
                process = subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent()
                )
            except OSError as err:  # the launcher or python could not be started: the last outputs go back
                shutil.rmtree(directory)
                if previous.exists():
                    os.replace(previous, directory)
                raise StageFailed(
                    f"stage {stage.name} could not start {command[0]!r}: {err.strerror or err}; check launcher= "
                    f"(what the stage had made before is kept)"
                ) from None
            if previous.exists():
                shutil.rmtree(previous)
            code = wait_for(process)
        seconds = time.monotonic() - started
        missing = [o for o in stage.outputs if not (directory / o).exists()]
        if code != 0 or missing:
            tail = "".join((directory / LOG).read_text(errors="replace").splitlines(keepends=True)[-15:])
            what = f"exited with status {code}" if code else f"did not write {', '.join(missing)}"
            raise StageFailed(f"stage {stage.name} {what}; its log: {directory / LOG}\n{tail}")
        finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_json(
            directory / DONE,
            {
                "stage": stage.name,
                "fingerprint": fingerprint,
                "command": shown,
                "seconds": round(seconds, 1),
                "finished": finished,
                "outputs": stage.outputs,
                "files": self.files(stage),  # a rerun reuses the stage only while these are as they were
            },
            indent=1,
        )
        self.durations.setdefault(_kind(stage), []).append(seconds)
        self.echo(f"  {stage.name}: done in {_duration(seconds)} ({reason})")
        return Outcome(stage, Status.RAN, reason, round(seconds, 1), shown, fingerprint)


def _names(value: Any) -> list[str] | None:
    """stages=/force= as a list of names or patterns: a bare string is one name (stages=plots), not its letters."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _seal(path: Path) -> str:
    """What a file is recorded by: its sha256, or its size and modification time above DIGEST_UP_TO."""
    stat = path.stat()
    if stat.st_size > DIGEST_UP_TO:
        return f"size {stat.st_size}, modified {stat.st_mtime_ns}"
    return "sha256:" + file_digest(path, "sha256")


def die_with_parent() -> Callable[[], None]:
    """A preexec_fn for a process that must not outlive this one: it leads a process group of its own (which
    wait_for ends with everything the stage started), and on Linux the kernel sends it SIGTERM when this process dies,
    however it dies (SIGKILL included). SIGTERM rather than SIGKILL so that a launcher (torchrun, srun) or Lightning
    passes it on to the processes they started."""
    parent = os.getpid()
    prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None

    def preexec() -> None:
        os.setpgid(0, 0)
        if prctl is not None:
            prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the runner died before the signal was asked for
                os._exit(1)

    return preexec


def wait_for(process: subprocess.Popen) -> int:
    """Its exit status; if this process stops waiting (Ctrl-C, an error), the stage's whole process group ends too."""
    try:
        return process.wait()
    finally:
        if process.returncode is None:
            stop_group(process)


def stop_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the process group `process` leads, then, after `grace` seconds at most, SIGKILL to what is left of it
    (the leader if it ignored SIGTERM, what it started)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _kind(stage: Stage) -> str:
    return stage.name.split("/")[0]  # train/<model>, generate/<model>/<set>, judge/<opponent>, plots


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
