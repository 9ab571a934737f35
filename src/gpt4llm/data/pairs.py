"""Comparison data for the reward model: a file of ranked responses -> (prompt, chosen, rejected) pairs -> tokenized,
cached train/validation splits -> batches with every chosen and rejected sequence stacked for one forward pass.

Three layouts are read, detected record by record, into the same pairs:

  comparison_data_v2   {"user_input", "responses_and_scores": [{"response", "score", "source"}, ...]}
                       every two responses with different scores make a pair, the higher score preferred;
                       tied pairs are dropped and counted
  comparison_data (v1) {"user_input", "completion_a", "completion_b"}: completion_a preferred
  plain                {"prompt", "chosen", "rejected"}

A reward-model sequence is `prompt + response + EOS` (the SFT text, so the reward is read where the policy stops),
right-truncated at `max_length`, and the reward is read at its last token. `build_pair_splits` is the one code path
shared by training and `gpt4llm.prepare`, and `encode_responses` the one shared with `gpt4llm.inference.rewards`.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import DatasetDict
from torchdata.stateful_dataloader import StatefulDataLoader

from gpt4llm.data.cache import SplitSettings, cached_splits, tokenize_rows
from gpt4llm.data.demo_pairs import write_demo_pairs_file
from gpt4llm.data.encoding import encode_truncated, padded_batch
from gpt4llm.data.prompts import PREAMBLES, alpaca_prompt
from gpt4llm.data.records import RecordError, read_json_records, unicode_problem
from gpt4llm.data.splits import SplitsDataModule
from gpt4llm.models.tokenizer import describe

CACHE_VERSION = 1  # bump when parsing, tokenization or the split change what the cache holds
LAYOUTS = {  # name -> the fields that only this layout has
    "comparison_data_v2": ("responses_and_scores",),
    "comparison_data_v1": ("completion_a", "completion_b"),
    "plain": ("chosen", "rejected"),
}


class _Problem(ValueError):
    """A record that cannot be read as it is; becomes a RecordError (or a counted skip with skip_invalid)."""


def _layout(record: dict) -> str:
    for name, fields in LAYOUTS.items():
        if any(f in record for f in fields):
            return name
    raise _Problem(
        "is not a comparison record: expected 'responses_and_scores' (comparison_data_v2), "
        "'completion_a'/'completion_b' (v1) or 'prompt'/'chosen'/'rejected'"
    )


def _string(record: dict, name: str, where: str = "") -> str:
    label = f"{where}.{name}" if where else name
    if name not in record:
        raise _Problem(f"field '{label}' is missing")
    if not isinstance(record[name], str):
        raise _Problem(f"field '{label}' is {type(record[name]).__name__}, not a string")
    if problem := unicode_problem(record[name]):
        raise _Problem(f"field '{label}' {problem}")
    return record[name]


def _score(item: dict, where: str) -> float:
    if "score" not in item:
        raise _Problem(f"field '{where}.score' is missing")
    score = item["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise _Problem(f"field '{where}.score' is {score!r} ({type(score).__name__}), not a number")
    return float(score)


def _ranked_responses(record: dict, layout: str) -> tuple[str, list[tuple[str, float]]]:
    """The raw prompt and (response, score) pairs of one record, higher score preferred; raises _Problem."""
    if layout == "plain":
        return _string(record, "prompt"), [(_string(record, "chosen"), 1.0), (_string(record, "rejected"), 0.0)]
    prompt = _string(record, "user_input")
    if layout == "comparison_data_v1":
        return prompt, [(_string(record, "completion_a"), 1.0), (_string(record, "completion_b"), 0.0)]
    items = record["responses_and_scores"]
    if not isinstance(items, list):
        raise _Problem(f"field 'responses_and_scores' is {type(items).__name__}, not a list")
    ranked = []
    for j, item in enumerate(items):
        where = f"responses_and_scores[{j}]"
        if not isinstance(item, dict):
            raise _Problem(f"field '{where}' is {type(item).__name__}, not an object with 'response' and 'score'")
        ranked.append((_string(item, "response", where), _score(item, where)))
    return prompt, ranked


def read_comparison_pairs(path: str | Path, skip_invalid: bool = False) -> tuple[list[dict], dict[str, Any]]:
    """Every (prompt, chosen, rejected) pair of a comparison file, each with its record's index, and what was dropped.

    Structural problems (not an object, a missing or non-string field, a missing or non-numeric score) stop with the
    file, record and field, unless `skip_invalid`; a record with fewer than two responses, tied scores, identical
    responses and repeated pairs are always dropped and counted.
    """
    raw = read_json_records(path)
    layouts: Counter = Counter()
    skipped: dict[str, list[int]] = defaultdict(list)  # reason -> record indices
    dropped: dict[str, list[int]] = defaultdict(list)  # reason -> record index of each dropped pair
    templated = candidates = 0
    pairs, seen = [], set()
    for index, record in enumerate(raw):
        try:
            if not isinstance(record, dict):
                raise _Problem(f"is a JSON {type(record).__name__}, not an object")
            layout = _layout(record)
            raw_prompt, ranked = _ranked_responses(record, layout)
        except _Problem as problem:
            if not skip_invalid:
                raise RecordError(f"{path}: record {index}: {problem} (set data.skip_invalid=true to skip such records)") from None
            skipped[str(problem)].append(index)
            continue
        layouts[layout] += 1
        if not raw_prompt.strip():
            skipped["empty prompt"].append(index)
            continue
        if len(ranked) < 2:
            skipped["fewer than two responses"].append(index)
            continue
        templated += raw_prompt.lstrip().startswith(PREAMBLES)
        prompt = alpaca_prompt(raw_prompt)
        for a in range(len(ranked)):
            for b in range(a + 1, len(ranked)):
                candidates += 1
                (text_a, score_a), (text_b, score_b) = ranked[a], ranked[b]
                chosen, rejected = (text_a, text_b) if score_a > score_b else (text_b, text_a)
                if score_a == score_b:
                    dropped["tied scores"].append(index)
                elif text_a == text_b:
                    dropped["identical responses"].append(index)
                elif (prompt, chosen, rejected) in seen:
                    dropped["duplicate pair"].append(index)
                else:
                    seen.add((prompt, chosen, rejected))
                    pairs.append({"index": index, "prompt": prompt, "chosen": chosen, "rejected": rejected})
    report = {
        "records": len(raw),
        "layouts": dict(layouts),
        "prompts_already_templated": templated,
        "candidate_pairs": candidates,
        "skipped_records": _counted(skipped),
        "dropped_pairs": _counted(dropped),
    }
    return pairs, report


def _counted(reasons: dict[str, list[int]]) -> dict[str, dict]:
    return {reason: {"count": len(ix), "first_indices": sorted(set(ix))[:10]} for reason, ix in reasons.items()}


def encode_responses(tokenizer, prompts: list[str], responses: list[str], max_length: int) -> tuple[list[list[int]], list[int]]:
    """Token ids of `prompt + response + EOS`, right-truncated at `max_length`, and each untruncated length."""
    return encode_truncated(tokenizer, [p + r + tokenizer.eos_token for p, r in zip(prompts, responses)], max_length)


def tokenize_pairs(batch: dict[str, list], tokenizer, max_length: int) -> dict[str, list]:
    """`datasets.map(batched=True)` function: pairs -> chosen/rejected ids and audit columns."""
    chosen, chosen_len = encode_responses(tokenizer, batch["prompt"], batch["chosen"], max_length)
    rejected, rejected_len = encode_responses(tokenizer, batch["prompt"], batch["rejected"], max_length)
    return {
        "chosen_input_ids": chosen,
        "rejected_input_ids": rejected,
        "untruncated_tokens": [max(a, b) for a, b in zip(chosen_len, rejected_len)],
        "truncated": [max(a, b) > max_length for a, b in zip(chosen_len, rejected_len)],
        # Identical ids carry no preference (their loss is log 2 whatever the model): responses that differ only
        # past max_length, or in text the tokenizer maps to the same ids.
        "identical_ids": [a == b for a, b in zip(chosen, rejected)],
    }


def build_pair_splits(path: str | Path, tokenizer, settings: SplitSettings, cache_dir: str | Path) -> tuple[DatasetDict, dict[str, Any]]:
    """Tokenized train/validation pairs and the audit report, from the cache when this was prepared before.

    `val_size` counts prompts: all pairs of a held-out prompt are held out (comparison_data_v2 gives up to three
    pairs per prompt, and a prompt seen in training would flatter the held-out accuracy).
    """
    path = Path(path)
    max_length, val_size, split_seed, skip_invalid = settings.max_length, settings.val_size, settings.split_seed, settings.skip_invalid

    def build() -> tuple[DatasetDict, dict[str, Any]]:
        pairs, read_report = read_comparison_pairs(path, skip_invalid=skip_invalid)
        if not pairs:
            raise ValueError(f"{path}: no usable pairs ({json.dumps(read_report)})")
        tokenized = tokenize_rows(pairs, tokenize_pairs, tokenizer, max_length, path)
        identical = [i for i, same in enumerate(tokenized["identical_ids"]) if same]
        usable = [i for i, same in enumerate(tokenized["identical_ids"]) if not same]
        column = tokenized["prompt"]
        prompts = list(dict.fromkeys(column[i] for i in usable))  # unique, in file order
        if val_size >= len(prompts):
            raise ValueError(f"{path}: data.val_size={val_size} prompts leaves none to train on ({len(prompts)} prompts)")
        held_out = set(random.Random(split_seed).sample(prompts, val_size))
        splits = DatasetDict(
            train=tokenized.select([i for i in usable if column[i] not in held_out]),
            validation=tokenized.select([i for i in usable if column[i] in held_out]),
        )
        return splits, _report(path, read_report, tokenized, identical, splits, val_size, max_length, tokenizer)

    return cached_splits("pairs", CACHE_VERSION, path, tokenizer, asdict(settings), cache_dir, build)


def _report(path, read_report, tokenized, identical, splits, val_size, max_length, tokenizer) -> dict[str, Any]:
    indices = tokenized["index"]
    lengths = np.asarray(tokenized["untruncated_tokens"])
    truncated = [indices[i] for i, cut in enumerate(tokenized["truncated"]) if cut]
    dropped = dict(read_report["dropped_pairs"])
    if identical:
        dropped["identical after tokenization"] = {
            "count": len(identical), "first_indices": sorted({indices[i] for i in identical})[:10]
        }
    return {
        "file": str(path),
        "tokenizer": describe(tokenizer),
        "max_length": max_length,
        **{k: v for k, v in read_report.items() if k != "dropped_pairs"},
        "pairs": len(splits["train"]) + len(splits["validation"]),
        "dropped_pairs": dropped,
        "ties_dropped": dropped.get("tied scores", {}).get("count", 0),
        "splits": {name: len(split) for name, split in splits.items()},
        "validation_prompts": val_size,
        # a pair is truncated when either sequence is; a truncated response loses its end and its EOS
        "truncated": {"count": len(truncated), "first_indices": truncated[:10]},
        "token_length_percentiles": {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 95, 99)}
        | {"max": int(lengths.max())},
    }


class PairCollator:
    """B pairs -> one batch of 2B sequences, the B chosen first, then the B rejected in the same order."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        sequences = [e["chosen_input_ids"] for e in examples] + [e["rejected_input_ids"] for e in examples]
        return padded_batch(sequences, self.pad_token_id)


class PairDataModule(SplitsDataModule):
    """Comparison records from one file (local, downloaded, or the generated demo) as reward-model batches."""

    audit_columns = ("index", "chosen_input_ids", "rejected_input_ids")  # what `gpt4llm.prepare` writes per pair
    model_columns = ("chosen_input_ids", "rejected_input_ids")
    missing_file_hint = (
        "Point data.path at your comparison file (.json or .jsonl): "
        "prompt/chosen/rejected, user_input/completion_a/completion_b, or user_input/responses_and_scores."
    )

    def __init__(self, *args, required_fields: list[str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)  # SplitsDataModule's: the file, split, batch size, cache
        self.required_fields = tuple(required_fields or ())

    def write_demo(self, path: Path, **settings) -> Path:
        return write_demo_pairs_file(path, **settings)

    def build_splits(self, file: Path) -> tuple[DatasetDict, dict[str, Any]]:
        return build_pair_splits(file, self.tokenizer, self.split_settings(), self.cache_dir)

    def summary(self) -> str:
        r = self.report
        dropped = {reason: d["count"] for reason, d in r["dropped_pairs"].items()}
        skipped = {reason: s["count"] for reason, s in r["skipped_records"].items()}
        return (
            f"Pairs {r['file']}: {r['splits']}; ids by {r['tokenizer']['backend']}; records skipped {skipped or 'none'}; "
            f"pairs dropped {dropped or 'none'}; truncated at {self.max_length} tokens: {r['truncated']['count']}"
        )

    def eval_collate(self) -> PairCollator:
        return PairCollator(self.tokenizer.pad_token_id)

    def train_dataloader(self) -> StatefulDataLoader:
        split = self.splits["train"].select_columns(list(self.model_columns))
        return self.loader(split, self.shuffled(split, self.split_seed), self.batch_size, self.eval_collate())
