"""The quick tier's walk through every layer in one process, in seconds: the tiny model built locally, the demo data
tokenized and cached, two optimizer steps, the verified export, and one request through `serve` with the official
`openai` client. The slow tier runs each of these as a user does (subprocesses, more steps, every strategy)."""

from __future__ import annotations

import json

import pytest

from gpt4llm.inference.server import load_server
from gpt4llm.train import train
from helpers.configs import compose_train, demo_overrides


def test_train_two_steps_export_and_answer_one_request(tmp_path):
    from openai import OpenAI

    cfg = compose_train(demo_overrides(tmp_path, "trainer.max_steps=2", "data.exact_match_examples=0"))
    cfg.paths.output_dir = str(tmp_path / "run")  # what Hydra's runtime would set
    metrics = train(cfg)
    assert metrics["val/loss"] > 0
    export = tmp_path / "run" / "export"
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["global_step"] == 2
    # where the time went, every phase: they add up to the whole (started at train(): no process start in-process)
    phases = ("start-up", "tokenizer_and_data", "model", "training_and_validation", "export")
    seconds = [written[f"time/{p}_s"] for p in phases]
    assert all(s >= 0 for s in seconds) and seconds[3] > 0 and seconds[4] > 0
    assert sum(seconds) == pytest.approx(written["time/total_s"], abs=0.01)
    assert (export / "config.json").exists() and (export / "tokenizer_config.json").exists()

    server = load_server(str(export), name="smoke").start()
    try:
        client = OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="smoke",
            messages=[{"role": "user", "content": "Sort the numbers: 3, 1, 2"}],
            max_tokens=4,
            temperature=0,
        )
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 4
    finally:
        server.close()
