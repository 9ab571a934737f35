"""Best-of-N decoding (the paper's section 3(e)): sample N responses per prompt from an SFT model, rank them with a
reward model, and keep the greedy single decode as the baseline B.

    python -m gpt4llm.bestofn sft_model=<sft run>/export reward_model=<rm run>/export prompts=questions.jsonl n=5

`prompts` is a JSON list or JSONL file of Alpaca records: `instruction`, optional `input`, optional `id` (default:
the record's index). Draw k (k = 0..n-1) of a prompt samples with its own generator, seeded by `seed`, the prompt's id
and k (models.decoding.request_seed), so a run is repeatable and a draw does not depend on the other prompts.

Output, `<run dir>/bestofn.jsonl` unless `output=` says otherwise: one JSON object per prompt, in input order:

    {"id": ..., "instruction": "...", "input": "...",
     "ranked": [{"rank": 1, "response": "...", "reward": 1.73, "draw": 3},    # the highest reward
                ...,
                {"rank": n, "response": "...", "reward": -0.41, "draw": 0}],  # the lowest
     "baseline": {"response": "...", "reward": 0.52}}                        # greedy decoding: group B

The paper's ranking group k is every prompt's `ranked[k-1]`; group B is `baseline`. Rewards are the reward model's
raw scores (gpt4llm.inference.scoring.score_records), comparable within one reward model; equal rewards keep draw order.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def read_prompts(path: str | Path) -> list[dict]:
    """Alpaca records with `id`, `instruction` and `input`; a clear error naming file, record and field otherwise."""
    from gpt4llm.errors import RecordError
    from gpt4llm.io.json_files import read_json_records

    prompts = []
    for index, record in enumerate(read_json_records(path)):
        if not isinstance(record, dict):
            raise RecordError(f"{path}: record {index}: is a JSON {type(record).__name__}, not an object")
        if "instruction" not in record:
            raise RecordError(f"{path}: record {index}: field 'instruction' is missing")
        for name in ("instruction", "input"):
            if name in record and not isinstance(record[name], str):
                raise RecordError(
                    f"{path}: record {index}: field '{name}' is {type(record[name]).__name__}, not a string"
                )
        prompts.append(
            {"id": record.get("id", index), "instruction": record["instruction"], "input": record.get("input", "")}
        )
    return prompts


def best_of_n(
    sft_model: str | Path,
    reward_model: str | Path,
    prompts: list[dict],
    n: int = 5,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
    engine: str = "hf",
) -> list[dict]:
    """The output rows described in the module docstring, one per prompt. `engine`: hf, or vllm on a GPU."""
    import torch

    from gpt4llm.inference.resumable_generation import load_generator
    from gpt4llm.inference.scoring import score_records
    from gpt4llm.models.decoding import generate_completions, generate_responses
    from gpt4llm.models.vllm_engine import is_vllm

    model, tokenizer, fmt = load_generator(str(sft_model), engine=engine, seed=seed)
    # all n draws of every prompt in one run of the engine, each seeded by the prompt's id and its draw number
    draws = [[""] * len(prompts) for _ in range(n)]
    for [i], [samples] in generate_completions(
        model,
        tokenizer,
        fmt.record_prompts(tokenizer, prompts),
        max_new_tokens,
        batch_size,
        num_samples=n,
        progress=f"{n} draws",
        add_special_tokens=fmt.add_special_tokens,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        keys=[str(p["id"]) for p in prompts],
    ):
        for k, sample in enumerate(samples):
            draws[k][i] = sample.text
    log.info(f"{n} draws of {len(prompts)} prompts")
    baseline = generate_responses(model, tokenizer, prompts, max_new_tokens, batch_size, fmt)  # greedy, as trained
    if is_vllm(model):
        model.close()
    del model  # the reward model needs the memory next
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    # All n + 1 responses of every prompt in one scoring pass: draw 0 of every prompt, then draw 1, ..., baseline.
    candidates = [*draws, baseline]
    records = [p | {"response": r} for responses in candidates for p, r in zip(prompts, responses)]
    rewards = score_records(reward_model, records, batch_size)
    by_draw = [rewards[k * len(prompts) : (k + 1) * len(prompts)] for k in range(len(candidates))]
    rows = []
    for i, prompt in enumerate(prompts):
        order = sorted(range(n), key=lambda k: -by_draw[k][i])  # stable: equal rewards keep draw order
        ranked = [
            {"rank": rank, "response": draws[k][i], "reward": by_draw[k][i], "draw": k}
            for rank, k in enumerate(order, 1)
        ]
        rows.append(prompt | {"ranked": ranked, "baseline": {"response": baseline[i], "reward": by_draw[n][i]}})
    return rows
