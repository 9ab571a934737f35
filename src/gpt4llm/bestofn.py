"""Best-of-N decoding (the paper's section 3(e)): `python -m gpt4llm.bestofn sft_model=<sft run>/export
reward_model=<rm run>/export prompts=questions.jsonl n=5`. What it writes: gpt4llm.inference.best_of_n."""

from __future__ import annotations

from omegaconf import DictConfig

from gpt4llm.app.cli import hydra_command, reports_user_errors, use_hydra_logging


@hydra_command("bestofn")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    from gpt4llm.inference.best_of_n import best_of_n, read_prompts
    from gpt4llm.io import json_files
    from gpt4llm.models.vllm_engine import check_engine

    use_hydra_logging()
    check_engine(cfg.engine)  # before the prompts are read
    rows = best_of_n(
        cfg.sft_model,
        cfg.reward_model,
        read_prompts(cfg.prompts),
        cfg.n,
        cfg.max_new_tokens,
        cfg.batch_size,
        cfg.temperature,
        cfg.top_p,
        cfg.seed,
        cfg.engine,
    )
    output = json_files.write_jsonl(cfg.output, rows)
    print(f"Best-of-{cfg.n} for {len(rows)} prompts -> {output}")


if __name__ == "__main__":
    main()
