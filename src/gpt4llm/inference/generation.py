"""Batched generation from an instruction-tuned model with the training prompt template.

`generate_responses` is the in-memory form (held-out exact match, best-of-N); `generate_completions` the batch-level
form that `gpt4llm.serve` runs its batches through; `generate_to_file` is the form behind `python -m gpt4llm.generate`:
it appends one JSON line per record as each batch finishes and, run again on the same file, skips the ids already
there, so a killed run loses at most the batch it was in.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from gpt4llm.data.prompts import format_prompt


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
    **sampling,
) -> Iterator[tuple[list[int], list[list[Completion]]]]:
    """Yields, batch by batch, the indices into `prompts` and `num_samples` completions for each.

    Longest prompts first, so each left-padded batch wastes little and a batch that does not fit in memory fails at
    the start rather than after an hour. Left padding puts every prompt's last token at the same position, where
    generation starts; the attention mask hides the pads, so a batched greedy answer equals the one-by-one answer.
    """
    from tqdm.auto import tqdm

    encoded = tokenizer(prompts)["input_ids"]  # as training tokenizes the prompt (BOS included where the model has one)
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
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


def _completion(tokenizer, tokens: list[int], eos: int) -> Completion:
    # After a row's EOS, generate fills with pad until the whole batch is done: everything from EOS on is dropped.
    if eos in tokens:
        tokens, reason = tokens[: tokens.index(eos)], "eos"
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
    **sampling,
) -> list[str]:
    """One response per record (`instruction`, optional `input`), in input order; `sampling` goes to `generate`
    (greedy unless it says do_sample=True)."""
    prompts = [format_prompt(r["instruction"], r.get("input", "")) for r in records]
    responses: list[str] = [""] * len(prompts)
    for rows, completions in generate_completions(model, tokenizer, prompts, max_new_tokens, batch_size, **sampling):
        for i, samples in zip(rows, completions):
            responses[i] = samples[0].text
    return responses


def generate_to_file(
    model,
    tokenizer,
    records: list[dict[str, Any]],
    path: str | Path,
    decoding: dict[str, Any],
    batch_size: int = 16,
    extra: dict[str, Any] | None = None,
    progress: str | None = "Generating",
) -> dict[str, int]:
    """Appends a JSON line per record to `path`: the record's fields (`id`, `instruction`, `input`, and `category`,
    `reference` where it has them), `prompt`, `response` (`responses` too when decoding.num_samples > 1),
    `finish_reason`, `num_tokens`, `decoding`, and `extra` (e.g. the model's name).

    `decoding`: max_new_tokens, num_samples, do_sample, and temperature / top_p when sampling. Ids already in the
    file are skipped; a file written with other decoding settings is refused rather than mixed.
    """
    path = Path(path)
    done = read_done_ids(path, decoding)
    todo = [r for r in records if str(r["id"]) not in done]
    counts = {"records": len(records), "already_done": len(records) - len(todo), "generated": 0, "empty": 0, "cut_by_length": 0}
    if not todo:
        return counts
    sampling = {k: decoding[k] for k in ("temperature", "top_p", "top_k") if decoding.get("do_sample") and k in decoding}
    prompts = [format_prompt(r["instruction"], r.get("input", "")) for r in todo]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for rows, completions in generate_completions(
            model, tokenizer, prompts, decoding["max_new_tokens"], batch_size, decoding.get("num_samples", 1),
            progress=progress, do_sample=bool(decoding.get("do_sample")), **sampling,
        ):
            for i, samples in zip(rows, completions):
                first = samples[0]
                line = dict(todo[i]) | (extra or {}) | {
                    "prompt": prompts[i],
                    "response": first.text,
                    "finish_reason": first.finish_reason,
                    "num_tokens": first.num_tokens,
                    "decoding": decoding,
                }
                if len(samples) > 1:
                    line["responses"] = [s.text for s in samples]
                    line["finish_reasons"] = [s.finish_reason for s in samples]
                    line["num_tokens_all"] = [s.num_tokens for s in samples]
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
                counts["generated"] += 1
                counts["empty"] += not first.text.strip()
                counts["cut_by_length"] += first.finish_reason == "length"
            f.flush()  # a batch on disk is a batch a rerun will not redo
            os.fsync(f.fileno())
    return counts


def read_done_ids(path: Path, decoding: dict[str, Any]) -> set[str]:
    """Ids of the complete lines in `path`. A last line torn by a kill is cut off, so the next append starts clean."""
    if not path.exists():
        return set()
    done, good_bytes = set(), 0
    with open(path, "rb") as f:
        lines = f.readlines()
    for lineno, raw in enumerate(lines, start=1):
        try:
            line = json.loads(raw) if raw.endswith(b"\n") else None
        except json.JSONDecodeError:
            line = None
        if not isinstance(line, dict) or "id" not in line:
            if lineno == len(lines):
                break  # torn by a kill mid-write: dropped, and generated again
            raise ValueError(f"{path}: line {lineno} is not a JSON object with an 'id'; fix or remove it to resume")
        if line.get("decoding") != decoding:
            raise ValueError(
                f"{path}: line {lineno} was generated with decoding={line.get('decoding')}, this run asks for "
                f"{decoding}. Write to another file (output=... or hydra.run.dir=...) instead of mixing them."
            )
        done.add(str(line["id"]))
        good_bytes += len(raw)
    if good_bytes < path.stat().st_size:
        with open(path, "rb+") as f:
            f.truncate(good_bytes)
    return done
