"""Running the commands as a user does (`python -m gpt4llm.<command>`), and reading what a run logged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2


def run_cli(module: str, args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` offline in `cwd`; fails the test with the end of its output unless it exits 0."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **env)
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def write(path: Path, records) -> Path:
    """`records` as a JSON file (a list of Alpaca records, say)."""
    path.write_text(json.dumps(records, ensure_ascii=False))
    return path


def events(run_dir: Path, **size_guidance) -> EventAccumulator:
    """A run's TensorBoard events, as TensorBoard reads them (purge_step honoured)."""
    return EventAccumulator(str(run_dir / "tensorboard"), size_guidance=size_guidance or None).Reload()


def scalars(run_dir: Path) -> dict[str, list[float]]:
    """Every scalar tag of a run, with its values in step order."""
    logged = events(run_dir)
    return {tag: [e.value for e in logged.Scalars(tag)] for tag in logged.Tags()["scalars"]}


def scalars_by_step(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar tag of a run, with its values by step."""
    logged = events(run_dir)
    return {tag: {e.step: e.value for e in logged.Scalars(tag)} for tag in logged.Tags()["scalars"]}


def hparams_of(run: Path) -> tuple[dict, set[str]]:
    """The hyperparameters and metric tags TensorBoard's HParams plugin reads from a run's events."""
    content = events(run, tensors=0).PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    params = {
        k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
        for k, v in session.session_start_info.hparams.items()
    }
    return params, {m.name.tag for m in experiment.experiment.metric_infos}


def raw_chat_request(key: str, body: bytes) -> bytes:
    """A whole POST /v1/chat/completions as bytes, for tests that drive serve through a bare socket (hang-ups,
    half-sent requests)."""
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + key.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
