"""Batched generation from an instruction-tuned model with the training prompt template."""

from __future__ import annotations

import torch

from gpt4llm.prompts import format_prompt


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    records: list[dict[str, str]],
    max_new_tokens: int = 256,
    batch_size: int = 16,
    **sampling,
) -> list[str]:
    """One response per record (`instruction`, optional `input`), in input order.

    Prompts are sorted by length so that each left-padded batch wastes little, and decoding stops at EOS.
    """
    prompts = [format_prompt(r["instruction"], r.get("input", "")) for r in records]
    encoded = tokenizer(prompts)["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    responses: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        longest = max(len(encoded[i]) for i in rows)
        input_ids = torch.full((len(rows), longest), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for j, i in enumerate(rows):  # left padding: every prompt ends where generation starts
            input_ids[j, longest - len(encoded[i]) :] = torch.tensor(encoded[i])
            attention_mask[j, longest - len(encoded[i]) :] = 1
        output = model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=attention_mask.to(model.device),
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **({"do_sample": False} | sampling),
        )
        for j, i in enumerate(rows):
            responses[i] = tokenizer.decode(output[j, longest:], skip_special_tokens=True)
    model.train(was_training)
    return responses
