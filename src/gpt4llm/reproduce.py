"""Reproduce: `python -m gpt4llm.reproduce` runs the paper's whole study (SFT of three models, the reward model,
generation on three benchmarks, ROUGE-L, the GPT-4 review, best-of-N, every figure) as cached stages, and writes a
report of our numbers beside the paper's: logs/reproduce/<preset>/report.md and report.html.

`preset=tiny` rehearses every stage on a CPU in about ten minutes, offline. The same command again reuses every
unchanged stage whose recorded outputs are intact; `stages=[generate/*]` runs some alone; `force=[plots]` redoes one;
a second run on the same study stops at once, naming the first. The stages:
gpt4llm.reproduction.study; the runner and its cache: gpt4llm.reproduction.runner; the report:
gpt4llm.reproduction.study_report."""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig

from gpt4llm.app.cli import hydra_command, reports_user_errors


def reproduce(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig

    from gpt4llm.errors import StageFailed
    from gpt4llm.io.study_lock import study_lock
    from gpt4llm.reproduction.runner import Pipeline
    from gpt4llm.reproduction.study import build_stages, judge_server_for
    from gpt4llm.reproduction.study_report import write_report

    started = time.monotonic()
    root = Path(cfg.out).resolve()
    server = judge_server_for(cfg.preset.judge, root)
    stages = build_stages(cfg, root, server)
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    command = " ".join(["python -m gpt4llm.reproduce", *overrides])
    pipeline = Pipeline(  # checks stages= and force= (a bare string is one stage's name)
        root,
        stages,
        force=cfg.force,
        only=cfg.stages,
        echo=lambda line: print(line, flush=True),
    )
    # One run per study at a time: two would empty each other's stages mid-run and write stage.json over half-made
    # outputs. A second one stops here, naming the first (gpt4llm.io.study_lock).
    with study_lock(root, "reproduce.lock", "run reproduce", command) as stale:
        if stale:
            print(
                f"Taking over the lock of a run that ended without releasing it (pid {stale.get('pid')} on "
                f"{stale.get('host')}, started {stale.get('started')})",
                flush=True,
            )
        print(f"Study {cfg.preset.name}: {len(stages)} stages in {root}", flush=True)
        try:
            outcomes = pipeline.run()
        except StageFailed as failed:  # the report still says what ran, what was reused and which stage failed
            write_report(root, cfg, getattr(failed, "outcomes", []), command, time.monotonic() - started)
            raise
        finally:
            if server is not None:
                server.stop()
        report = write_report(root, cfg, outcomes, command, time.monotonic() - started)
    print(f"Report: {report['markdown']}\n        {report['html']}", flush=True)
    return {"outcomes": outcomes, **report}


@hydra_command("reproduce")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    reproduce(cfg)


if __name__ == "__main__":
    main()
