"""A stand-in for one of our commands in the reproduce runner's tests, started as the stage's launcher:
`python fake_stage.py -m <module> key=value ... hydra.run.dir=<dir>`. It writes `write=<file>` (relative to the run
directory, `text=<content>`), writes its pid to `pid=<path>`, then sleeps `sleep=<seconds>`, touching `tick` in the
run directory every 0.1 s meanwhile (what a stage that keeps writing does)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

settings = dict(arg.split("=", 1) for arg in sys.argv[1:] if "=" in arg)
run_dir = Path(settings["hydra.run.dir"])
if "write" in settings:
    target = run_dir / settings["write"]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(settings.get("text", "made"))
if "pid" in settings:
    Path(settings["pid"]).write_text(str(os.getpid()))
deadline = time.monotonic() + float(settings.get("sleep", 0))
while time.monotonic() < deadline:
    (run_dir / "tick").write_text(str(time.time()))
    time.sleep(0.1)
