"""The runner's ETA: shown only when every stage left has a measured duration of its own or of its kind."""

from __future__ import annotations

import json

from gpt4llm.reproduction.runner import Pipeline, Stage


def stages() -> list[Stage]:
    return [
        Stage("train/a", "gpt4llm.train", []),
        Stage("train/b", "gpt4llm.train", []),
        Stage("generate/a/set", "gpt4llm.generate", []),
        Stage("plots", "gpt4llm.plots", []),
        Stage("judge/gpt4", "gpt4llm.evaluate", [], skip="no judge key"),
    ]


def test_no_eta_before_anything_is_timed(tmp_path):
    assert Pipeline(tmp_path, stages(), echo=lambda line: None).eta(1) == ""


def test_one_training_stage_does_not_time_the_plots(tmp_path):
    pipeline = Pipeline(tmp_path, stages(), echo=lambda line: None)
    pipeline.durations = {"train": [120.0]}
    # The old ETA, the mean of the stages done times the stages left, said "about 8m00s" here.
    assert pipeline.eta(2) == (
        " (3 stages left; the 1 stage run so far took 2m00s; no ETA until each kind of stage left has been timed)"
    )


def test_eta_from_the_stages_of_each_kind_and_their_last_durations(tmp_path):
    pipeline = Pipeline(tmp_path, stages(), echo=lambda line: None)
    pipeline.durations = {"train": [100.0, 140.0], "generate": [30.0]}
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "stage.json").write_text(json.dumps({"seconds": 5.0}))
    # generate/a/set: 30 s (its kind this run), plots: 5 s (its own last run); the skipped judge stage is not counted
    assert (
        pipeline.eta(3) == " (ETA about 35s: 2 stages left, timed by their last run or this run's stages of their kind)"
    )
    pipeline.only = ["train/*"]  # the stages not selected do not run
    assert (
        pipeline.eta(2)
        == " (ETA about 2m00s: 1 stage left, timed by their last run or this run's stages of their kind)"
    )
