"""Where a training process's seconds go, from the moment the process started: what a user waits for is the whole
process, not the train loop. `train` prints the phases in its run summary and writes them into metrics.json
(`time/<phase>_s`); rank 0's clock.

  start-up                the interpreter, the imports, the composed config (process start to train's first step)
  tokenizer and data      the tokenizer, the data module and its tokenization (to Lightning's `setup` hook)
  model                   configure_model (loading the weights, adapters, sharding), the strategy's set-up, a DPO
                          reference pass (to the first validation or fit)
  training and validation the train loop and every validation
  export                  the Hugging Face export, gathered, written and verified
"""

from __future__ import annotations

import time

import lightning as L

PHASES = ("start-up", "tokenizer and data", "model", "training and validation", "export")


def process_started() -> float:
    """When this process started (seconds since the epoch): psutil's reading of the operating system's."""
    import psutil

    return psutil.Process().create_time()


_runs_in_this_process = 0


def run_started() -> float:
    """When the command's run began: the process's start for its first run, now for each later one (Hydra's multirun
    launches a sweep's jobs one after another in one process)."""
    global _runs_in_this_process
    _runs_in_this_process += 1
    return process_started() if _runs_in_this_process == 1 else time.time()


class PhaseClock(L.Callback):
    """Marks the end of each phase of PHASES: `train` marks the ones it runs itself, Lightning's hooks the others
    (a phase ends once, the first time its hook runs: validate_first and fit both set the run up)."""

    def __init__(self, started: float) -> None:
        self.started = started  # when the run's time began (run_started, or train's own start)
        self.ends: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}: one of {', '.join(PHASES)}")
        self.ends.setdefault(phase, time.time())

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.mark("tokenizer and data")

    def on_validation_start(self, trainer, pl_module) -> None:
        self.mark("model")

    def on_fit_start(self, trainer, pl_module) -> None:
        self.mark("model")

    def seconds(self) -> dict[str, float]:
        """Each phase marked so far and how long it took (a phase not run, an export turned off, is left out)."""
        out, previous = {}, self.started
        for phase in PHASES:
            end = self.ends.get(phase)
            if end is not None:
                out[phase] = max(0.0, end - previous)
                previous = end
        return out

    def summary(self) -> str:
        phases = self.seconds()
        total = sum(phases.values())
        return f"{total:.1f} s in all: " + ", ".join(f"{name} {s:.1f} s" for name, s in phases.items())

    def metrics(self) -> dict[str, float]:
        """The phases as metrics.json keys: time/start-up_s, time/model_s, ... and time/total_s."""
        phases = self.seconds()
        out = {f"time/{name.replace(' ', '_')}_s": round(s, 3) for name, s in phases.items()}
        out["time/total_s"] = round(sum(phases.values()), 3)
        return out
