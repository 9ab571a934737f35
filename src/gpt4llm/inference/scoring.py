"""Rewards of responses from a trained reward model export, sequences built and truncated as in its training."""

from __future__ import annotations

from pathlib import Path

from gpt4llm.data.formats import PromptFormat
from gpt4llm.errors import ConfigError, RecordError
from gpt4llm.io import json_files
from gpt4llm.models import model_card


def record_prompt(record: dict, index: int, prompt_format: PromptFormat) -> str:
    """The prompt of a record to score, as the reward model's format renders it (data.formats), or a RecordError
    naming the record and the field."""
    if not isinstance(record, dict):
        raise RecordError(f"record {index}: is a JSON {type(record).__name__}, not an object")
    if "prompt" not in record and "instruction" not in record:
        raise RecordError(f"record {index}: needs a 'prompt' or an 'instruction' field")
    fields = ("response", "prompt") if "prompt" in record else ("response", "instruction", "input")
    for name in fields:
        if name not in record and name != "input":  # input is optional
            raise RecordError(f"record {index}: field '{name}' is missing")
        if name in record and not isinstance(record[name], str):
            raise RecordError(f"record {index}: field '{name}' is {type(record[name]).__name__}, not a string")
    return prompt_format.score_prompt(record)


def score_records(
    model_dir: str | Path, records: list[dict], batch_size: int = 8, normalize: bool = False
) -> list[float]:
    """One reward per record (`prompt` or `instruction`/`input`, and `response`), in input order.

    Sequences are built and truncated exactly as in reward-model training, and the reward is read at the last token.
    With `normalize`, rewards are shifted and scaled by the statistics in the export's config.
    """
    from gpt4llm.models.reward_scoring import RewardModelScorer

    scorer = RewardModelScorer(model_dir, batch_size=batch_size)
    for i, r in enumerate(records):
        record_prompt(r, i, scorer.format)  # each record checked, named where it is wrong, before anything runs
    rewards = scorer(records, [r["response"] for r in records])
    if normalize:
        mean, std = reward_statistics(scorer.model.config, model_dir)
        rewards = [(r - mean) / std for r in rewards]
    return rewards


def reward_statistics(config, model_dir) -> tuple[float, float]:
    """The validation reward mean and std that `train task=rm` recorded in the export's card."""
    card = model_card.read(config)
    mean, std = card.reward_mean, card.reward_std
    if mean is None or not std:
        raise ConfigError(f"{model_dir}: no reward_mean/reward_std in its config (trained without validation data)")
    return mean, std


def score_file(model_dir: str | Path, path: str | Path, output: str | Path | None = None, batch_size: int = 8) -> Path:
    from transformers import AutoConfig

    from gpt4llm.io.json_files import read_json_records

    path = Path(path)
    output = Path(output) if output else path.with_name(f"{path.stem}.scored.jsonl")
    records = read_json_records(path)
    try:
        rewards = score_records(model_dir, records, batch_size)
    except RecordError as err:
        raise RecordError(f"{path}: {err}") from None
    config = AutoConfig.from_pretrained(str(model_dir))
    stats = reward_statistics(config, model_dir) if model_card.read(config).reward_std else None
    normalized = [{"reward_normalized": (r - stats[0]) / stats[1]} if stats else {} for r in rewards]
    return json_files.write_jsonl(output, [rec | {"reward": r} | n for rec, r, n in zip(records, rewards, normalized)])
