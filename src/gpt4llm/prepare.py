"""The data audit: `python -m gpt4llm.prepare data=... model=...`.

Tokenizes the selected dataset exactly as training will (same code, same cache), writes the processed examples
(one JSON line each: index, input_ids, labels) and a report under the run directory, and prints the report.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, open_dict

from gpt4llm.app.cli import hydra_command, reports_user_errors, use_hydra_logging


def prepare(cfg: DictConfig) -> dict:
    from gpt4llm.app.checks import check_config, check_values
    from gpt4llm.io import atomic, json_files
    from gpt4llm.models.hf import prepare_tokenizer
    from gpt4llm.training.datamodules import build_datamodule

    check_config(cfg.data, "data")
    check_values(cfg)
    tokenizer, trains = prepare_tokenizer(
        cfg.model.path, cfg.model.tiny, cfg.model.tokenizer, cfg.data.get("template", "auto")
    )
    with open_dict(cfg.data):
        cfg.data.template = trains.format.name  # what data.template=auto decided
    print(f"Prompt format: {trains.why}")
    datamodule = build_datamodule(cfg, tokenizer)  # online RL's tasks audit the prompts they sample from
    splits, report = datamodule.build()
    out = Path(cfg.paths.output_dir) / "prepared"
    with atomic.atomic_path(out) as tmp:  # the examples and the report appear together or not at all
        tmp.mkdir()
        for name, split in splits.items():
            with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as f:
                for row in split.select_columns(list(datamodule.audit_columns)):
                    f.write(json.dumps(row) + "\n")
        json_files.write_json(tmp / "report.json", report, indent=2)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    print(f"\nProcessed examples: {', '.join(str(out / f'{n}.jsonl') for n in splits)}\nReport: {out / 'report.json'}")
    return report


@hydra_command("train")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    use_hydra_logging()
    prepare(cfg)


if __name__ == "__main__":
    main()
