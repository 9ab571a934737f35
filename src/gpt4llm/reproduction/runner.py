"""A small stage runner: each stage is one of our commands (`python -m gpt4llm.<command> <overrides>`) run in a
directory of its own, `<root>/<stage name>/`, and is done when that directory holds `stage.json`, written last.

- Cached: a stage's fingerprint is the digest of its command, the fingerprints of the stages it reads, the content of
  the outside files it reads, and our version. A rerun reuses every stage whose fingerprint is unchanged and redoes
  the rest (their directory is emptied first, so nothing half-written is ever read: a directory without stage.json is
  never used).
- Failures stop the run with the stage's name, exit status, log and last lines; earlier stages keep what they made.
- Progress: "[n/N] stage: ..." with an ETA only once every stage left has a measured duration: its own last time, or
  this run's stages of its kind (train, generate, judge ...: a training stage says nothing of a plot's time).

Why not DVC or Hydra's multirun: DVC wants the project to be a git + DVC repository and its own dvc.yaml beside our
Hydra configs (two sources of truth for one command line); Hydra's multirun runs independent jobs of one command, not
a chain of different commands that read each other's outputs. What is needed here (fingerprints, a done-marker, an
order) is a hundred lines.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
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
from gpt4llm.errors import ConfigError, GPT4LLMError, StageFailed
from gpt4llm.io.atomic import write_text

DONE = "stage.json"
LOG = "stage.log"


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
        self.force, self.only = list(force), list(only) if only else None
        self.echo = echo
        self.fingerprints: dict[str, str] = {}
        self.durations: dict[str, list[float]] = {}  # kind -> seconds of the stages this invocation ran, for the ETA
        names = [s.name for s in stages]
        for stage in stages:
            unknown = [n for n in stage.needs + stage.after if n not in names[: names.index(stage.name)]]
            if unknown:
                raise ConfigError(f"stage {stage.name} needs {unknown}, which do not come before it")

    def directory(self, stage: Stage) -> Path:
        return self.root / stage.name

    def record(self, stage: Stage) -> dict[str, Any] | None:
        path = self.directory(stage) / DONE
        return json.loads(path.read_text()) if path.is_file() else None

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

    def run(self) -> list[Outcome]:
        """Every stage's outcome, in order. A failed stage stops the run: its StageFailed carries the outcomes so far
        (`.outcomes`, the failed one last), so the report can still be written."""
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
        record = self.record(stage)
        unfinished = [n for n in stage.needs if by_name[n].status == Status.NOT_SELECTED and not by_name[n].fingerprint]
        if stage.skip or blocked:
            return Outcome(stage, Status.SKIPPED, stage.skip or f"it needs {', '.join(blocked)}, which did not run")
        if not self.selected(stage):
            fp = None if unfinished else self.fingerprint(stage)
            done = fp is not None and record is not None and record.get("fingerprint") == fp
            if fp:
                self.fingerprints[stage.name] = fp
            return Outcome(
                stage,
                Status.NOT_SELECTED,
                "" if done else "not selected, and not done with these settings",
                record.get("seconds") if done else None,
                record.get("command", "") if done else "",
                fp if done else "",
            )
        if unfinished:
            raise StageFailed(
                f"stage {stage.name} needs {', '.join(unfinished)}, which has not run with these "
                f"settings: select it too (stages=[...]) or run without stages="
            )
        self.fetch_inputs(stage)
        fp = self.fingerprint(stage)
        self.fingerprints[stage.name] = fp
        if record and record.get("fingerprint") == fp and stage.name not in self.force:
            return Outcome(
                stage, Status.REUSED, f"unchanged since {record['finished']}", record["seconds"], record["command"], fp
            )
        self.echo(f"[{index}/{len(self.stages)}] {stage.name}: running{self.eta(index)}")
        return self.execute(stage, fp, "its settings or inputs changed" if record else "not done before")

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
        record = self.record(stage)
        if record and record.get("seconds") is not None:
            return record["seconds"]
        same_kind = self.durations.get(_kind(stage))
        return sum(same_kind) / len(same_kind) if same_kind else None

    def execute(self, stage: Stage, fingerprint: str, reason: str) -> Outcome:
        directory = self.directory(stage)
        if directory.exists():
            shutil.rmtree(directory)  # a changed or half-made stage starts empty
        directory.mkdir(parents=True)
        args = [*stage.args, *(stage.runtime_args() if stage.runtime_args else [])]
        command = [*(stage.launcher or [sys.executable]), "-m", stage.module, *args, f"hydra.run.dir={directory}"]
        shown = " ".join(command[1:] if not stage.launcher else command)
        started = time.monotonic()
        env = dict(os.environ, TOKENIZERS_PARALLELISM=os.environ.get("TOKENIZERS_PARALLELISM", "false"))
        if (
            stage.launcher
        ):  # every rank the launcher starts writes to this one directory (training.hardware.check_launch)
            env["GPT4LLM_RUN_ID"] = f"{stage.name.replace('/', '_')}_{fingerprint}"
        with (directory / LOG).open("w") as log:
            log.write(f"$ {shown}\n")
            log.flush()
            code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        seconds = time.monotonic() - started
        missing = [o for o in stage.outputs if not (directory / o).exists()]
        if code != 0 or missing:
            tail = "".join((directory / LOG).read_text(errors="replace").splitlines(keepends=True)[-15:])
            what = f"exited with status {code}" if code else f"did not write {', '.join(missing)}"
            raise StageFailed(f"stage {stage.name} {what}; its log: {directory / LOG}\n{tail}")
        finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_text(
            directory / DONE,
            json.dumps(
                {
                    "stage": stage.name,
                    "fingerprint": fingerprint,
                    "command": shown,
                    "seconds": round(seconds, 1),
                    "finished": finished,
                    "outputs": stage.outputs,
                },
                indent=1,
            ),
        )
        self.durations.setdefault(_kind(stage), []).append(seconds)
        self.echo(f"  {stage.name}: done in {_duration(seconds)} ({reason})")
        return Outcome(stage, Status.RAN, reason, round(seconds, 1), shown, fingerprint)


def _kind(stage: Stage) -> str:
    return stage.name.split("/")[0]  # train/<model>, generate/<model>/<set>, judge/<opponent>, plots


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
