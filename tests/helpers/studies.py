"""Human-evaluation studies for the tests: answer files of two models, the criteria, the command started as a server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

CRITERIA = {"helpfulness": "helps", "honesty": "true", "harmlessness": "no harm"}
ITEMS = 6


def write_responses(directory: Path, model: str, ids=range(ITEMS)) -> Path:
    path = directory / model / "responses.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in ids:
            f.write(
                json.dumps(
                    {
                        "id": f"q{i}",
                        "instruction": f"Task {i}: write <b>a</b> poem",
                        "model": model,
                        "input": ""
                        if i % 2
                        else "<img src=x onerror=\"document.title='pwned'\"><script>window.pwned=1</script>",
                        # Each answer names its model and item, so a test reading the page can un-blind it by itself.
                        "response": f"[{model} on q{i}] <script>window.pwned=1</script>\nsecond line",
                    }
                )
                + "\n"
            )
    return path


def start_cli(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpt4llm.humaneval", "port=0", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline, lines = time.time() + 60, []
    while time.time() < deadline and proc.poll() is None:
        line = proc.stdout.readline()
        lines.append(line)
        if line.startswith("Raters start at "):
            return proc, line.split(" at ", 1)[1].strip().rstrip("/")
    proc.kill()
    raise AssertionError("".join(lines) + (proc.stdout.read() or ""))


def lines_until(proc: subprocess.Popen, prefix: str, timeout: float = 60) -> list[str]:
    """The server's next lines of output, up to and with the first that starts with `prefix` (the rater links a
    start prints come after "Raters start at" and before "Sign-up:")."""
    deadline, lines = time.time() + timeout, []
    while time.time() < deadline and proc.poll() is None:
        lines.append(proc.stdout.readline().rstrip("\n"))
        if lines[-1].startswith(prefix):
            return lines
    raise AssertionError("\n".join(lines))
