"""Comparison pairs for the reward model and DPO: a comparison file (data.comparisons) -> (prompt, chosen, rejected)
pairs -> tokenized, cached train/validation splits -> batches with every chosen and rejected sequence stacked for one
forward pass (data.collators.PairCollator).

A sequence is prompt + response + its end as the prompt format builds it (data.formats; for the paper's format
`prompt + response + EOS`, the SFT text, so the reward is read where the policy stops), right-truncated at
`max_length`, and the reward is read at its last token. `build_pair_splits` is the one code path shared by training and
`gpt4llm.prepare`; the format's `reward_ids` the one shared with `gpt4llm.inference.scoring`.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
from datasets import DatasetDict
from torchdata.stateful_dataloader import StatefulDataLoader

from gpt4llm.data.base_datamodule import SplitsDataModule, check_usable, held_out
from gpt4llm.data.cache import SplitSettings, cached_splits, tokenize_rows
from gpt4llm.data.collators import PairCollator
from gpt4llm.data.comparisons import PAIRINGS, read_comparison_pairs
from gpt4llm.data.demo_pairs import write_demo_pairs_file
from gpt4llm.data.formats import prompt_format
from gpt4llm.data.samplers import InOrderSampler
from gpt4llm.data.tokenizer import describe
from gpt4llm.errors import ConfigError

CACHE_VERSION = 4  # bump when parsing, tokenization or the split change what the cache holds


def tokenize_pairs(batch: dict[str, list], tokenizer, max_length: int, template: str = "alpaca") -> dict[str, list]:
    """`datasets.map(batched=True)` function: pairs -> chosen/rejected ids as the prompt format `template` builds them
    (data.formats), how many of each sequence's first tokens are the prompt (`*_prompt_tokens`: DPO sums
    log-probabilities over the rest), and audit columns."""
    chosen, rejected = prompt_format(template).tokenize_pairs(batch, tokenizer, max_length)
    return {
        "chosen_input_ids": chosen.ids,
        "rejected_input_ids": rejected.ids,
        "chosen_prompt_tokens": chosen.prompt_tokens,
        "rejected_prompt_tokens": rejected.prompt_tokens,
        "untruncated_tokens": [max(a, b) for a, b in zip(chosen.lengths, rejected.lengths)],
        "truncated": [max(a, b) > max_length for a, b in zip(chosen.lengths, rejected.lengths)],
        # a prompt longer than half of max_length, its start cut so that the answers keep room (keep_the_answer)
        "prompt_cut": [a or b for a, b in zip(chosen.prompt_cut, rejected.prompt_cut)],
        # Identical ids carry no preference (their loss is log 2 whatever the model): responses that differ only
        # past max_length, or in text the tokenizer maps to the same ids.
        "identical_ids": [a == b for a, b in zip(chosen.ids, rejected.ids)],
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
        pairs, read_report = read_comparison_pairs(
            path, skip_invalid=skip_invalid, template=settings.template, pairing=settings.pairing
        )
        if not pairs:
            check_usable(path, 0, val_size, "pairs", json.dumps(read_report))
        tokenized = tokenize_rows(pairs, tokenize_pairs, tokenizer, max_length, path, template=settings.template)
        identical = [i for i, same in enumerate(tokenized["identical_ids"]) if same]
        usable = [i for i, same in enumerate(tokenized["identical_ids"]) if not same]
        column = tokenized["prompt"]
        prompts = list(dict.fromkeys(column[i] for i in usable))  # unique, in file order
        held = held_out(val_size, len(prompts))
        check_usable(
            path,
            len(prompts),
            held,
            "prompts",
            f"{len(prompts)} prompts, {len(usable)} pairs; val_size counts prompts",
        )
        validation_prompts = set(random.Random(split_seed).sample(prompts, held))
        splits = DatasetDict(
            train=tokenized.select([i for i in usable if column[i] not in validation_prompts]),
            validation=tokenized.select([i for i in usable if column[i] in validation_prompts]),
        )
        report = _report(path, read_report, tokenized, identical, splits, held, max_length, tokenizer)
        return splits, report | {"template": settings.template}

    return cached_splits("pairs", CACHE_VERSION, path, tokenizer, asdict(settings), cache_dir, build)


def _report(path, read_report, tokenized, identical, splits, val_size, max_length, tokenizer) -> dict[str, Any]:
    indices = tokenized["index"]
    lengths = np.asarray(tokenized["untruncated_tokens"])
    truncated = [indices[i] for i, cut in enumerate(tokenized["truncated"]) if cut]
    prompt_cut = [indices[i] for i, cut in enumerate(tokenized["prompt_cut"]) if cut]
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
        # of those, pairs whose prompt took more than half of max_length: its start cut, the answers kept
        "prompt_cut": {"count": len(prompt_cut), "first_indices": prompt_cut[:10]},
        "token_length_percentiles": {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 95, 99)}
        | {"max": int(lengths.max())},
    }


class PairDataModule(SplitsDataModule):
    """Comparison records from one file (local, downloaded, or the generated demo) as batches of pairs: for the reward
    model, and for preference optimisation (task=dpo), which also reads the labels (the response tokens) and, when
    the reference is precomputed, each pair's row in its split (`index_pairs`), by which it finds the pair's reference
    log-probabilities."""

    audit_columns = ("index", "chosen_input_ids", "rejected_input_ids")  # what `gpt4llm.prepare` writes per pair
    model_columns = ("chosen_input_ids", "rejected_input_ids", "chosen_prompt_tokens", "rejected_prompt_tokens")
    missing_file_hint = (
        "Point data.path at your comparison file (.json or .jsonl): "
        "prompt/chosen/rejected, user_input/completion_a/completion_b, or user_input/responses_and_scores."
    )

    def __init__(
        self, *args, required_fields: list[str] | None = None, pairing: str = "all", packed: bool = False, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)  # SplitsDataModule's: the file, split, batch size, cache
        if pairing not in PAIRINGS:
            raise ConfigError(f"data.pairing={pairing!r}: choose one of {', '.join(PAIRINGS)}")
        self.required_fields = tuple(required_fields or ())
        self.pairing = pairing  # comparison_data_v2's scored lists as pairs
        self.packed = packed  # DPO: a batch's sequences in one row (data.collators.PairCollator)

    def split_settings(self) -> SplitSettings:
        return replace(super().split_settings(), pairing=self.pairing)

    def index_pairs(self, split: str) -> None:
        """Each pair of `split` with its row, `pair_index`, which its batches then carry: DPO's precomputed reference
        log-probabilities stay with the DPO module (in fp32, out of the batches) and are found by it."""
        if "pair_index" not in self.splits[split].column_names:
            self.splits[split] = self.splits[split].add_column("pair_index", list(range(len(self.splits[split]))))

    def pairs_digest(self, split: str) -> str:
        """sha256 of what a reference pass reads of `split`, pair by pair in row order: the chosen and rejected ids and
        their prompt lengths. DPO's precomputed reference is cached under it: the same pairs, the same numbers."""
        import hashlib

        import pyarrow as pa
        import pyarrow.compute as pc

        digest = hashlib.sha256(f"{split}:{len(self.splits[split])}".encode())
        data = self.splits[split].select_columns(list(self.model_columns)).with_format("arrow")
        for batch in data.iter(batch_size=65536):  # fixed batches: the same rows, the same digest
            for name in self.model_columns:
                column = batch.column(name).combine_chunks()
                if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
                    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
                    digest.update(f"{name}.lengths".encode() + np.asarray(lengths, dtype=np.int64).tobytes())
                    column = column.flatten()
                values = np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.int64)
                digest.update(name.encode() + values.tobytes())
        return digest.hexdigest()

    def write_demo(self, path: Path, **settings) -> Path:
        return write_demo_pairs_file(path, **settings)

    def build_splits(self, file: Path) -> tuple[DatasetDict, dict[str, Any]]:
        return build_pair_splits(file, self.tokenizer, self.split_settings(), self.cache_dir)

    def summary(self) -> str:
        r = self.report
        dropped = {reason: d["count"] for reason, d in r["dropped_pairs"].items()}
        skipped = {reason: s["count"] for reason, s in r["skipped_records"].items()}
        return (
            f"Pairs {r['file']}: {r['splits']}, template {r.get('template', 'alpaca')}, pairing {self.pairing}; "
            f"ids by {r['tokenizer']['backend']}; records skipped {skipped or 'none'}; "
            f"pairs dropped {dropped or 'none'}; truncated at {self.max_length} tokens: {r['truncated']['count']}"
            f" (of which the prompt's start cut: {r['prompt_cut']['count']})"
        )

    def columns(self, split: str) -> list[str]:
        indexed = "pair_index" in self.splits[split].column_names
        return [*self.model_columns, *(["pair_index"] if indexed else [])]

    def eval_collate(self) -> PairCollator:
        return PairCollator(self.tokenizer.pad_token_id)

    def val_dataloader(self) -> StatefulDataLoader:
        split = self.splits["validation"].select_columns(self.columns("validation"))
        return self.loader(split, self.in_order(split), self.eval_batch_size, self.eval_collate())

    def train_dataloader(self) -> StatefulDataLoader:
        split = self.splits["train"].select_columns(self.columns("train"))
        collate = PairCollator(self.tokenizer.pad_token_id, packed=self.packed)
        return self.loader(split, self.shuffled(split, self.split_seed), self.batch_size, collate)

    def reference_loader(self, split: str, batch_size: int) -> StatefulDataLoader:
        """The split in file order, padded, for the reference pass (without `pair_index`)."""
        data = self.splits[split].select_columns(list(self.model_columns))
        return self.loader(data, InOrderSampler(len(data)), batch_size, self.eval_collate())
