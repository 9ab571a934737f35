"""The run summary's phases (gpt4llm.training.phases): each phase from the end of the one before, the ones not run
left out, and a sweep's later jobs timed from their own start, not the process's."""

from __future__ import annotations

import time

import pytest

from gpt4llm.training import phases


def test_phases_follow_one_another_and_skip_what_did_not_run():
    clock = phases.PhaseClock(started=100.0)
    clock.ends = {"start-up": 104.0, "tokenizer and data": 105.5, "model": 106.0, "training and validation": 130.0}
    clock.mark("model")  # a second mark of a phase keeps the first (validate_first, then fit)
    assert clock.seconds() == {
        "start-up": 4.0,
        "tokenizer and data": 1.5,
        "model": 0.5,
        "training and validation": 24.0,
    }
    assert clock.metrics()["time/total_s"] == 30.0 and "time/export_s" not in clock.metrics()
    assert clock.summary().startswith("30.0 s in all: start-up 4.0 s, tokenizer and data 1.5 s")
    with pytest.raises(ValueError, match="unknown phase 'exprot'"):
        clock.mark("exprot")


def test_a_sweeps_later_jobs_start_their_clock_when_they_start(monkeypatch):
    monkeypatch.setattr(phases, "_runs_in_this_process", 0)
    monkeypatch.setattr(phases, "process_started", lambda: 1.0)
    assert phases.run_started() == 1.0  # the first run: the process's start (imports and all)
    assert phases.run_started() == pytest.approx(time.time(), abs=5)  # a later job of a multirun: now
