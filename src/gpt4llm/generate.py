"""Generate: `python -m gpt4llm.generate model.path=EXPORT eval=vicuna80|user_oriented252|unnatural|demo`.

Writes one JSON line per question to <run dir>/responses.jsonl (id, prompt, response, decoding settings, the
reference where the eval set has one). The run directory is logs/generate/<eval>/<model name>, so the same command
run again skips the ids already written: a killed run loses only the answers in progress.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from gpt4llm.app.cli import hydra_command, reports_user_errors
from gpt4llm.errors import ConfigError

log = logging.getLogger(__name__)


def decoding_settings(decoding: DictConfig, seed: int) -> dict:
    """The settings that shape the answers, written on every line: temperature, top_p and the seed only when
    sampling (each record samples with its own generator, seeded by `seed` and its id)."""
    settings = {
        "max_new_tokens": int(decoding.max_new_tokens),
        "do_sample": bool(decoding.do_sample),
        "num_samples": int(decoding.num_samples),
    }
    if settings["num_samples"] > 1 and not settings["do_sample"]:
        raise ConfigError(
            "decoding.num_samples > 1 needs decoding.do_sample=true: greedy answers would all be the same"
        )
    if settings["do_sample"]:
        settings |= {"temperature": float(decoding.temperature), "top_p": float(decoding.top_p), "seed": int(seed)}
    return settings


def generate(cfg: DictConfig) -> Path:
    import torch

    from gpt4llm.evaluation.eval_sets import load_eval_set
    from gpt4llm.inference.resumable_generation import generate_to_file, load_generator
    from gpt4llm.models.vllm_engine import check_engine

    if not cfg.model.path:
        raise ConfigError(
            "model.path is required: model.path=logs/train/runs/<time>/export, "
            "or any local Hugging Face causal LM directory"
        )
    decoding = decoding_settings(cfg.decoding, cfg.seed)
    check_engine(cfg.engine, cfg.model.device)  # before the eval set is fetched
    records = load_eval_set(**OmegaConf.to_container(cfg.eval, resolve=True))
    torch.manual_seed(cfg.seed)
    model, tokenizer, fmt = load_generator(
        cfg.model.path, cfg.model.dtype, cfg.model.device, cfg.model.tokenizer, cfg.engine, cfg.seed
    )
    output = Path(cfg.output)
    counts = generate_to_file(
        model,
        tokenizer,
        records,
        output,
        decoding,
        batch_size=cfg.batch_size,
        extra={"model": cfg.model.name, "eval": cfg.eval.name},
        progress=f"{cfg.eval.name} / {cfg.model.name}",
        prompt_format=fmt,
        seed=cfg.seed,
    )
    log.info(f"Responses: {counts}")
    print(
        f"\nResponses: {output}  ({counts['generated']} new, {counts['already_done']} already there, "
        f"{counts['empty']} empty, {counts['cut_by_length']} cut at max_new_tokens"
        + (f", {counts['prompt_too_long']} prompts longer than the context" if counts["prompt_too_long"] else "")
        + ")"
    )
    return output


@hydra_command("generate")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    generate(cfg)


if __name__ == "__main__":
    main()
