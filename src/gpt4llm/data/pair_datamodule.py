"""Comparison pairs for the reward model: a comparison file (data.comparisons) -> (prompt, chosen, rejected) pairs ->
tokenized, cached train/validation splits -> batches with every chosen and rejected sequence stacked for one forward
pass (data.collators.PairCollator).

A reward-model sequence is `prompt + response + EOS` (the SFT text, so the reward is read where the policy stops),
right-truncated at `max_length`, and the reward is read at its last token. `build_pair_splits` is the one code path
shared by training and `gpt4llm.prepare`; `data.encoding.encode_responses` the one shared with
`gpt4llm.inference.scoring`.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from datasets import DatasetDict
from torchdata.stateful_dataloader import StatefulDataLoader

from gpt4llm.data.base_datamodule import SplitsDataModule, check_usable
from gpt4llm.data.cache import SplitSettings, cached_splits, tokenize_rows
from gpt4llm.data.collators import PairCollator
from gpt4llm.data.comparisons import read_comparison_pairs
from gpt4llm.data.demo_pairs import write_demo_pairs_file
from gpt4llm.data.encoding import encode_responses, encode_truncated
from gpt4llm.data.templates import render
from gpt4llm.data.tokenizer import describe

CACHE_VERSION = 1  # bump when parsing, tokenization or the split change what the cache holds


def tokenize_pairs(batch: dict[str, list], tokenizer, max_length: int, template: str = "alpaca") -> dict[str, list]:
    """`datasets.map(batched=True)` function: pairs -> chosen/rejected ids and audit columns. With a chat template
    the prompt is a conversation (JSON) and each response its final assistant turn, rendered whole."""
    if template == "alpaca":
        chosen, chosen_len = encode_responses(tokenizer, batch["prompt"], batch["chosen"], max_length)
        rejected, rejected_len = encode_responses(tokenizer, batch["prompt"], batch["rejected"], max_length)
    else:
        prompts = [json.loads(p) for p in batch["prompt"]]
        (chosen, chosen_len), (rejected, rejected_len) = (
            encode_truncated(
                tokenizer,
                render(tokenizer, [p + [{"role": "assistant", "content": r}] for p, r in zip(prompts, batch[side])]),
                max_length,
                add_special_tokens=False,
            )
            for side in ("chosen", "rejected")
        )
    return {
        "chosen_input_ids": chosen,
        "rejected_input_ids": rejected,
        "untruncated_tokens": [max(a, b) for a, b in zip(chosen_len, rejected_len)],
        "truncated": [max(a, b) > max_length for a, b in zip(chosen_len, rejected_len)],
        # Identical ids carry no preference (their loss is log 2 whatever the model): responses that differ only
        # past max_length, or in text the tokenizer maps to the same ids.
        "identical_ids": [a == b for a, b in zip(chosen, rejected)],
    }


def build_pair_splits(
    path: str | Path, tokenizer, settings: SplitSettings, cache_dir: str | Path
) -> tuple[DatasetDict, dict[str, Any]]:
    """Tokenized train/validation pairs and the audit report, from the cache when this was prepared before.

    `val_size` counts prompts: all pairs of a held-out prompt are held out (comparison_data_v2 gives up to three
    pairs per prompt, and a prompt seen in training would flatter the held-out accuracy).
    """
    path = Path(path)
    max_length, val_size, split_seed, skip_invalid = (
        settings.max_length,
        settings.val_size,
        settings.split_seed,
        settings.skip_invalid,
    )

    def build() -> tuple[DatasetDict, dict[str, Any]]:
        pairs, read_report = read_comparison_pairs(path, skip_invalid=skip_invalid, template=settings.template)
        if not pairs:
            check_usable(path, 0, val_size, "pairs", json.dumps(read_report))
        tokenized = tokenize_rows(pairs, tokenize_pairs, tokenizer, max_length, path, template=settings.template)
        identical = [i for i, same in enumerate(tokenized["identical_ids"]) if same]
        usable = [i for i, same in enumerate(tokenized["identical_ids"]) if not same]
        column = tokenized["prompt"]
        prompts = list(dict.fromkeys(column[i] for i in usable))  # unique, in file order
        check_usable(
            path,
            len(prompts),
            val_size,
            "prompts",
            f"{len(prompts)} prompts, {len(usable)} pairs; val_size counts prompts",
        )
        held_out = set(random.Random(split_seed).sample(prompts, val_size))
        splits = DatasetDict(
            train=tokenized.select([i for i in usable if column[i] not in held_out]),
            validation=tokenized.select([i for i in usable if column[i] in held_out]),
        )
        report = _report(path, read_report, tokenized, identical, splits, val_size, max_length, tokenizer)
        return splits, report | {"template": settings.template}

    return cached_splits("pairs", CACHE_VERSION, path, tokenizer, asdict(settings), cache_dir, build)


def _report(path, read_report, tokenized, identical, splits, val_size, max_length, tokenizer) -> dict[str, Any]:
    indices = tokenized["index"]
    lengths = np.asarray(tokenized["untruncated_tokens"])
    truncated = [indices[i] for i, cut in enumerate(tokenized["truncated"]) if cut]
    dropped = dict(read_report["dropped_pairs"])
    if identical:
        dropped["identical after tokenization"] = {
            "count": len(identical),
            "first_indices": sorted({indices[i] for i in identical})[:10],
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
            f"Pairs {r['file']}: {r['splits']}, template {r.get('template', 'alpaca')}; "
            f"ids by {r['tokenizer']['backend']}; records skipped {skipped or 'none'}; "
            f"pairs dropped {dropped or 'none'}; truncated at {self.max_length} tokens: {r['truncated']['count']}"
        )

    def eval_collate(self) -> PairCollator:
        return PairCollator(self.tokenizer.pad_token_id)

    def train_dataloader(self) -> StatefulDataLoader:
        split = self.splits["train"].select_columns(list(self.model_columns))
        return self.loader(split, self.shuffled(split, self.split_seed), self.batch_size, self.eval_collate())
