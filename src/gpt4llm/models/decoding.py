"""Batched decoding from a causal LM with the prompts it was trained on, the one way every caller generates:
`generate_completions` (batch by batch, several samples per prompt; what `gpt4llm.serve` batches through),
`generate_responses` (one answer per Alpaca record: held-out exact match, best-of-N) and `truncate_completion`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from gpt4llm.data.formats import PromptFormat
from gpt4llm.models import model_card


@dataclass(frozen=True)
class Completion:
    text: str
    num_tokens: int  # generated tokens before EOS (EOS itself not counted)
    finish_reason: str  # "eos": the model ended it; "length": max_new_tokens cut it
    token_ids: tuple[int, ...] = ()  # the `num_tokens` generated ids (the server cuts a batch's answers per request)


@torch.no_grad()
def generate_completions(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 256,
    batch_size: int = 16,
    num_samples: int = 1,
    progress: str | None = None,
    add_special_tokens: bool = True,
    **sampling,
) -> Iterator[tuple[list[int], list[list[Completion]]]]:
    """Yields, batch by batch, the indices into `prompts` and `num_samples` completions for each.

    Longest prompts first, so each left-padded batch wastes little and a batch that does not fit in memory fails at
    the start rather than after an hour. Left padding puts every prompt's last token at the same position, where
    generation starts; the attention mask hides the pads, so a batched greedy answer equals the one-by-one answer.
    A completion ends at EOS or at any other id the model's generation config stops at (a chat template's end of
    turn). `add_special_tokens=False` for prompts rendered by a chat template, which writes its own BOS.
    """
    from tqdm.auto import tqdm

    # as training tokenizes the prompt (BOS included where the model has one and the template does not write it)
    encoded = tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    eos, pad = stop_ids(model, tokenizer), tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(prompts), desc=progress, unit="prompt", disable=progress is None)
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            longest = max(len(encoded[i]) for i in rows)
            input_ids = torch.full((len(rows), longest), pad, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for j, i in enumerate(rows):
                input_ids[j, longest - len(encoded[i]) :] = torch.tensor(encoded[i])
                attention_mask[j, longest - len(encoded[i]) :] = 1
            output = model.generate(
                input_ids=input_ids.to(model.device),
                attention_mask=attention_mask.to(model.device),
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
                num_return_sequences=num_samples,  # rows come back grouped: prompt 0's samples, then prompt 1's, ...
                use_cache=True,  # an export trained with gradient checkpointing says use_cache=False in its config
                **({"do_sample": False} | sampling),
            )
            new_tokens = output[:, longest:].tolist()
            completions = [
                [_completion(tokenizer, new_tokens[j * num_samples + s], eos) for s in range(num_samples)]
                for j in range(len(rows))
            ]
            yield rows, completions
            bar.update(len(rows))
    finally:
        bar.close()
        model.train(was_training)


def stop_ids(model, tokenizer) -> list[int]:
    """EOS, and whatever else the model's generation config ends a turn with (<|eot_id|>, <|im_end|>)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    return list(dict.fromkeys([tokenizer.eos_token_id, *configured]))


def _completion(tokenizer, tokens: list[int], eos: list[int]) -> Completion:
    # After a row's EOS, generate fills with pad until the whole batch is done: everything from EOS on is dropped.
    end = next((i for i, t in enumerate(tokens) if t in eos), None)
    if end is not None:
        tokens, reason = tokens[:end], "eos"
    else:
        reason = "length"
    return Completion(tokenizer.decode(tokens, skip_special_tokens=True), len(tokens), reason, tuple(tokens))


def truncate_completion(tokenizer, completion: Completion, max_tokens: int) -> Completion:
    """`completion` cut to its first `max_tokens` tokens ("length" when that cut anything). Greedy decoding gives the
    same first tokens whatever max_new_tokens was, so one batch can serve requests that asked for different limits."""
    if completion.num_tokens <= max_tokens:
        return completion
    ids = completion.token_ids[:max_tokens]
    return Completion(tokenizer.decode(list(ids), skip_special_tokens=True), len(ids), "length", ids)


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
    renders (data.formats; default: the model's, models.model_card.prompt_format_of); `sampling` goes to `generate`
    (greedy unless it says do_sample=True)."""
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
