"""Plan: `python -m gpt4llm.plan <the training overrides>` prints, offline, memory per GPU and per node, whether it
fits, FLOPs and time for the composed run (gpt4llm.training.memory_plan)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from gpt4llm.app.cli import hydra_command, reports_user_errors, use_hydra_logging


@hydra_command("plan")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    from gpt4llm.io import json_files
    from gpt4llm.training.memory_plan import format_plan, make_plan

    use_hydra_logging()
    plan = make_plan(cfg)
    print(format_plan(plan))
    out = json_files.write_json(Path(cfg.paths.output_dir) / "plan.json", plan.as_json(), indent=2)
    print(f"\nplan.json: {out}")


if __name__ == "__main__":
    main()
