"""Plan: `python -m gpt4llm.plan <the training overrides>` prints, offline, memory per GPU and per node, whether it
fits, FLOPs and time for the composed run (gpt4llm.training.memory_plan)."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

from gpt4llm.app.cli import CONFIG_PATH, reports_user_errors, use_hydra_logging


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="plan")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    from gpt4llm.io import atomic
    from gpt4llm.training.memory_plan import format_plan, make_plan

    use_hydra_logging()
    plan = make_plan(cfg)
    print(format_plan(plan))
    out = atomic.write_text(Path(cfg.paths.output_dir) / "plan.json", json.dumps(plan.as_json(), indent=2))
    print(f"\nplan.json: {out}")


if __name__ == "__main__":
    main()
