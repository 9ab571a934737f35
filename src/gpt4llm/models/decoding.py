"""Decoding from a causal LM with the prompts it was trained on, through the generation engine (models.engine):
`generate_completions` (several samples per prompt, seeded per record; what `gpt4llm.generate` writes) and
`generate_responses` / `generate_texts` (one answer per record or prompt: held-out exact match, best-of-N).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

from gpt4llm.data.formats import PromptFormat
from gpt4llm.models import model_card
from gpt4llm.models.engine import Completion, Engine, Request, Sampling


def generate_completions(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 256,
    batch_size: int = 16,
    num_samples: int = 1,
    progress: str | None = None,
    add_special_tokens: bool = True,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    keys: list | None = None,
    stop: tuple[str, ...] = (),
) -> Iterator[tuple[list[int], list[list[Completion]]]]:
    """Yields, as each prompt's answers are done, its index into `prompts` and its `num_samples` completions.

    Through the engine (models.engine; a model loaded with engine=vllm: models.vllm_engine): continuous batching of
    `batch_size * num_samples` sequences, longest prompt first. A completion ends at EOS or at any other id the model's
    generation config stops at (a chat template's end of turn), at a stop string, or at max_new_tokens. Sampling
    (`do_sample`) draws sample s of prompt i with the seed `request_seed(seed, keys[i], s)` (keys default to the
    prompts' indices): give each record's id as its key, and a rerun or a resumed run answers it the same whatever it is
    batched with. `add_special_tokens=False` for prompts rendered by a chat template, which writes its own BOS.
    """
    from tqdm.auto import tqdm

    # as training tokenizes the prompt (BOS included where the model has one and the template does not write it)
    encoded = tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]
    sampling = Sampling(temperature, top_p, top_k) if do_sample else None
    keys = list(range(len(prompts))) if keys is None else keys
    requests = [
        Request(tuple(encoded[i]), max_new_tokens, sampling, request_seed(seed, keys[i], s) if do_sample else 0, stop)
        for i in range(len(prompts))
        for s in range(num_samples)
    ]
    engine = engine_for(model, tokenizer, max_rows=batch_size * num_samples)
    answers: dict[int, list[Completion | None]] = {}
    with tqdm(total=len(prompts), desc=progress, unit="prompt", disable=progress is None) as bar:
        for k, completion in engine.run(requests):
            i, s = divmod(k, num_samples)
            samples = answers.setdefault(i, [None] * num_samples)
            samples[s] = completion
            if all(c is not None for c in samples):
                del answers[i]
                yield [i], [samples]
                bar.update(1)


def engine_for(model, tokenizer, max_rows: int):
    """The engine that runs `model`: vLLM's for a model vLLM loaded (engine=vllm: models.vllm_engine), else ours."""
    from gpt4llm.models.vllm_engine import VLLMEngine, is_vllm

    kind = VLLMEngine if is_vllm(model) else Engine
    return kind(model, tokenizer, stop_ids(model, tokenizer), max_rows=max_rows)


def request_seed(seed: int, key, sample: int = 0) -> int:
    """The seed of one request's generator, from the run's seed, the request's key (a record id) and its sample
    number: the same for the same request in any run, whatever else runs beside it."""
    digest = hashlib.sha256(json.dumps([seed, str(key), sample]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def stop_ids(model, tokenizer) -> list[int]:
    """EOS, and whatever else the model's generation config ends a turn with (<|eot_id|>, <|im_end|>)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    return list(dict.fromkeys([tokenizer.eos_token_id, *configured]))


def generate_responses(
    model,
    tokenizer,
    records: list[dict[str, str]],
    max_new_tokens: int = 256,
    batch_size: int = 16,
    prompt_format: PromptFormat | None = None,
    **sampling,
) -> list[str]:
    """One response per record (`instruction`, optional `input`), in input order, from the prompt `prompt_format`
    renders (data.formats; default: the model's, models.model_card.prompt_format_of); `sampling`: generate_completions'
    do_sample, temperature, top_p, top_k, seed, keys (greedy unless do_sample=True)."""
    fmt = prompt_format or model_card.prompt_format_of(model, tokenizer).format
    prompts = fmt.record_prompts(tokenizer, records)
    return generate_texts(model, tokenizer, prompts, max_new_tokens, batch_size, fmt.add_special_tokens, **sampling)


def generate_texts(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 256,
    batch_size: int = 16,
    add_special_tokens: bool = True,
    **sampling,
) -> list[str]:
    """One response per prompt, in input order."""
    responses: list[str] = [""] * len(prompts)
    batches = generate_completions(
        model, tokenizer, prompts, max_new_tokens, batch_size, add_special_tokens=add_special_tokens, **sampling
    )
    for rows, completions in batches:
        for i, samples in zip(rows, completions):
            responses[i] = samples[0].text
    return responses
