"""Score responses with a trained reward model: `python -m gpt4llm.score reward_model=<run dir>/export input=FILE`.

Each input record (JSONL or a JSON list) holds a `response` and its prompt: `prompt` (an Alpaca-templated prompt, or
plain text, which is templated) or `instruction` with an optional `input`. The output is every input record, in
order, with `reward` added, and `reward_normalized` = (reward - reward_mean) / reward_std, the statistics of the
reward model's validation split, where its export has them. It goes to `<input dir>/<input stem>.scored.jsonl`
unless `output=` says otherwise, written atomically.
"""

from __future__ import annotations

from omegaconf import DictConfig

from gpt4llm.app.cli import hydra_command, reports_user_errors, use_hydra_logging


@hydra_command("score")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    from gpt4llm.inference.scoring import score_file

    use_hydra_logging()
    output = score_file(cfg.reward_model, cfg.input, cfg.output, cfg.batch_size)
    print(f"Scored {cfg.input} -> {output}")


if __name__ == "__main__":
    main()
