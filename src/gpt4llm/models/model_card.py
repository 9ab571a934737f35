"""What an export records about its training, written and read here alone: the prompt format it learned, a reward
model's normalisation statistics and sequence length, the base model it started from, and its adapter's settings.

The record rides in the model's config.json (transformers keeps unknown config attributes through save and load), so
an export, a merged adapter export and a checkpoint's model all carry it with their weights. The keys keep the names
the first exports used (`gpt4llm_template`, `reward_mean`, ...), so older exports read the same.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from gpt4llm.data.formats import AUTO, PromptFormat, Resolved, prompt_format, resolve_format

# field -> config.json key
KEYS = {
    "prompt_format": "gpt4llm_template",
    "reward_mean": "reward_mean",
    "reward_std": "reward_std",
    "reward_max_length": "reward_max_length",
    "base_model": "gpt4llm_base_model",
    "adapter": "gpt4llm_adapter",
}


@dataclass(frozen=True)
class TrainingRecord:
    prompt_format: str | None = None  # data.template; None: not trained here
    reward_mean: float | None = None  # score = (reward - reward_mean) / reward_std puts any reward model on one scale
    reward_std: float | None = None
    reward_max_length: int | None = None  # a reward model's training length: scoring truncates as training did
    base_model: str | None = None  # model.path training started from
    adapter: dict | None = None  # the LoRA / QLoRA settings (models.adapters), None for full fine-tuning


def prompt_format_of(model, tokenizer=None) -> Resolved:
    """The prompt format to query `model` with: the one its card records; else, as data.template=auto decides, the
    one whose shipped template its tokenizer carries (an adapter directory of ours, whose config is the base's), the
    tokenizer's own chat template (a chat model not trained here), or the paper's Alpaca prompt (a base model)."""
    recorded = read(model).prompt_format
    if recorded:
        return Resolved(prompt_format(recorded), f"{recorded}, as its training recorded")
    return resolve_format(AUTO, tokenizer)


def read(config) -> TrainingRecord:
    """The record in a model's config (a PretrainedConfig, or a model that has one)."""
    config = getattr(config, "config", config)
    return TrainingRecord(**{name: getattr(config, key, None) for name, key in KEYS.items()})


def write(config, **values) -> None:
    """Sets the given record fields in a model's config (a PretrainedConfig, or a model that has one)."""
    config = getattr(config, "config", config)
    known = {f.name for f in fields(TrainingRecord)}
    for name, value in values.items():
        if name not in known:
            raise TypeError(f"{name!r} is not a field of the training record ({', '.join(sorted(known))})")
        setattr(config, KEYS[name], value)


def copy(source, target) -> None:
    """The record of `source`'s config into `target`'s (a merged export takes the trained model's)."""
    write(target, **{k: v for k, v in asdict(read(source)).items() if v is not None})


def record_training(model, tokenizer, fmt: PromptFormat, base_model: str | None, adapter: dict | None) -> None:
    """What training records as it builds the model: the format, the base, the adapter; and the format's end-of-turn
    ids among those the model's generation config stops at (so transformers' `generate` stops there too)."""
    write(model, prompt_format=fmt.name, base_model=str(base_model) if base_model else None, adapter=adapter)
    generation = getattr(model, "generation_config", None)  # a reward model (sequence classification) has none
    if generation is None:
        return
    configured = generation.eos_token_id
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    stops = list(dict.fromkeys([*configured, *fmt.stop_ids(tokenizer)]))
    if stops != configured:
        generation.eos_token_id = stops
