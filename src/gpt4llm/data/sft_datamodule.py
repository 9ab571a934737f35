"""The SFT data pipeline: a record file on disk -> validated records -> tokenized, cached train/validation splits.

`build_sft_splits` is the one code path shared by training and `gpt4llm.prepare` (the data audit), so the audit
shows exactly what the model is trained on, and both read the same cache.
"""

from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from datasets import DatasetDict
from torchdata.stateful_dataloader import StatefulDataLoader

from gpt4llm.data.base_datamodule import SplitsDataModule, check_usable, held_out
from gpt4llm.data.cache import SplitSettings, cached_splits, tokenize_rows
from gpt4llm.data.collators import PACKING_ATTENTION, PackedCollator, SFTCollator
from gpt4llm.data.demo import write_demo_file
from gpt4llm.data.formats import prompt_format
from gpt4llm.data.samplers import LengthGroupedSampler, ShuffledSampler
from gpt4llm.data.tokenizer import describe
from gpt4llm.errors import ConfigError

# How training batches are laid out: "packed" (one row, no padding: data.collators.PackedCollator), "grouped" (padded
# batches of similar lengths: data.samplers.LengthGroupedSampler), "random" (padded, in random order), or "auto".
BATCHING = ("auto", "packed", "grouped", "random")


def resolve_batching(batching: str, attn_implementation: str | None) -> str:
    """`auto`: packed where the attention runs each packed example on its own (flash attention's variable-length
    kernels, or models.attention's sdpa_varlen), grouped elsewhere: through plain SDPA, eager or flex attention a
    packed row is one block-masked attention over the sum of the lengths."""
    if batching != "auto":
        return batching
    return "packed" if attn_implementation in PACKING_ATTENTION else "grouped"


CACHE_VERSION = 3  # bump when reading, tokenize_batch or the split changes what it produces


def build_sft_splits(
    path: str | Path, tokenizer, settings: SplitSettings, cache_dir: str | Path
) -> tuple[DatasetDict, dict[str, Any]]:
    """Tokenized train/validation splits and the audit report, from the cache when this was prepared before."""
    path = Path(path)
    max_length, val_size, split_seed, skip_invalid = (
        settings.max_length,
        settings.val_size,
        settings.split_seed,
        settings.skip_invalid,
    )

    def build() -> tuple[DatasetDict, dict[str, Any]]:
        fmt = prompt_format(settings.template, settings.train_on)
        records, load_report = fmt.load_records(path, skip_invalid=skip_invalid)
        skipped = {reason: s["count"] for reason, s in load_report.summary()["skipped"].items()}
        if not records:
            check_usable(path, 0, val_size, "records", f"of {load_report.total}; skipped: {skipped or 'none'}")
        tokenized = tokenize_rows(records, fmt.tokenize_examples, tokenizer, max_length, path)
        # A prompt that fills the whole length (before a conversation's first assistant turn) leaves nothing
        # to learn from (stanford_alpaca kept such rows; their loss is 0/0), so they are dropped and reported.
        no_target = [i for i, n in enumerate(tokenized["supervised_tokens"]) if n == 0]
        usable = [i for i, n in enumerate(tokenized["supervised_tokens"]) if n > 0]
        counted = (
            f"{len(usable)} usable of {load_report.total} records; skipped: {skipped or 'none'}; "
            f"without a target: {len(no_target)}"
        )
        held = held_out(val_size, len(usable))
        check_usable(path, len(usable), held, "records", counted)
        order = random.Random(split_seed).sample(usable, len(usable))
        splits = DatasetDict(
            train=tokenized.select(sorted(order[held:])), validation=tokenized.select(sorted(order[:held]))
        )
        chat = fmt.conversational
        report = _report(path, load_report.summary(), tokenized, no_target, splits, max_length, tokenizer, chat)
        return splits, report | {"template": fmt.name} | ({"train_on": fmt.train_on} if chat else {})

    return cached_splits("sft", CACHE_VERSION, path, tokenizer, asdict(settings), cache_dir, build)


def _report(path, load_summary, tokenized, no_target, splits, max_length, tokenizer, chat=False) -> dict[str, Any]:
    lengths = np.asarray(tokenized["untruncated_tokens"])
    kept = np.asarray(tokenized["num_tokens"])
    supervised = np.asarray(tokenized["supervised_tokens"])
    indices = tokenized["index"]
    skipped = dict(load_summary["skipped"])
    if no_target:
        reason = "prompt before the first assistant turn fills max_length" if chat else "prompt fills max_length"
        skipped[reason] = {"count": len(no_target), "first_indices": [indices[i] for i in no_target[:10]]}
    truncated = [indices[i] for i in np.flatnonzero(lengths > max_length)]
    # Among the examples trained on: a truncated target loses its EOS, and a model never shown EOS never stops.
    dropped = set(no_target)
    missing_eos = [indices[i] for i, ok in enumerate(tokenized["ends_with_eos"]) if not ok and i not in dropped]
    return {
        "file": str(path),
        "tokenizer": describe(tokenizer),
        "max_length": max_length,
        "records": load_summary["records"],
        "unused_fields": load_summary["unused_fields"],  # in the file, not trained on: said, never dropped silently
        "usable": len(splits["train"]) + len(splits["validation"]),
        "skipped": skipped,
        "splits": {name: len(split) for name, split in splits.items()},
        "truncated": {"count": len(truncated), "first_indices": truncated[:10]},
        **({"turns_dropped": _turns_dropped(tokenized, no_target)} if chat else {}),
        **({"untrained_turns": _untrained_turns(tokenized)} if chat else {}),
        "missing_eos_label": {"count": len(missing_eos), "first_indices": missing_eos[:10]},
        "token_length_percentiles": {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 95, 99)}
        | {"max": int(lengths.max())},
        "supervised_token_fraction": round(float(supervised.sum() / kept.sum()), 4),
    }


def _turns_dropped(tokenized, no_target) -> dict[str, Any]:
    """Conversations cut at max_length after an earlier assistant turn (whole turns kept, later ones dropped)."""
    dropped, indices, skipped = tokenized["turns_dropped"], tokenized["index"], set(no_target)
    cut = [indices[i] for i, n in enumerate(dropped) if n and i not in skipped]
    return {
        "conversations": len(cut),
        "turns": sum(n for i, n in enumerate(dropped) if i not in skipped),
        "first_indices": cut[:10],
    }


def _untrained_turns(tokenized) -> dict[str, Any]:
    """Assistant turns the data marked `weight: 0`: kept as context, not trained on."""
    counts = [len(turns) for turns in tokenized["untrained"]] if "untrained" in tokenized.column_names else []
    return {"conversations": sum(n > 0 for n in counts), "turns": sum(counts)}


def padding_report(lengths: list[int], batch_size: int, seed: int, batching: str) -> dict[str, Any]:
    """The share of computed training tokens that are padding in an epoch, for each way of batching."""
    random_order = ShuffledSampler(len(lengths), seed).order(0)
    grouped_order = LengthGroupedSampler(lengths, batch_size, seed=seed).order(0)

    def pad_fraction(order: list[int]) -> float:
        batches = [[lengths[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]
        return round(1 - sum(map(sum, batches)) / sum(max(b) * len(b) for b in batches), 4)

    return {
        "batch_size": batch_size,
        "batching": batching,
        "pad_fraction": {"random": pad_fraction(random_order), "grouped": pad_fraction(grouped_order), "packed": 0.0},
    }


class SFTDataModule(SplitsDataModule):
    """Alpaca-format records from one file (local, downloaded, or the generated demo) as SFT batches."""

    audit_columns = ("index", "input_ids", "labels")  # what `gpt4llm.prepare` writes of each processed example
    model_columns = ("input_ids", "labels")
    required_fields = ("instruction", "output")
    missing_file_hint = "Point data.path at your Alpaca-format .json or .jsonl file."

    def __init__(
        self,
        *args,
        shuffle_seed: int | None = None,
        exact_match_examples: int = 0,
        batching: str = "auto",
        attn_implementation: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)  # SplitsDataModule's: the file, split, batch size, cache
        # The training order's seed: the split's unless given, so a sweep over it keeps the held-out set fixed.
        self.shuffle_seed = self.split_seed if shuffle_seed is None else shuffle_seed
        # For datasets whose answers are exact (the demo), generation on this many held-out records is scored.
        self.exact_match_examples = exact_match_examples
        if batching not in BATCHING:
            raise ConfigError(f"data.batching={batching!r}: choose one of {', '.join(BATCHING)}")
        self.batching = resolve_batching(batching, attn_implementation)

    def write_demo(self, path: Path, **settings) -> Path:
        return write_demo_file(path, **settings)

    def build_splits(self, file: Path) -> tuple[DatasetDict, dict[str, Any]]:
        splits, report = build_sft_splits(file, self.tokenizer, self.split_settings(), self.cache_dir)
        padding = padding_report(splits["train"]["num_tokens"], self.batch_size, self.shuffle_seed, self.batching)
        return splits, report | {"padding": padding}

    def summary(self) -> str:
        r = self.report
        skipped = {reason: s["count"] for reason, s in r["skipped"].items()}
        turns = (
            f"; assistant turns cut at max_length: {r['turns_dropped']['turns']}, "
            f"kept as context (weight 0): {r['untrained_turns']['turns']}"
            if "untrained_turns" in r
            else ""
        )
        return (
            f"Data {r['file']}: {r['splits']} examples, template {r.get('template', 'alpaca')}{turns}; "
            f"ids by {r['tokenizer']['backend']}; skipped {skipped or 'none'}; "
            f"fields not used: {r['unused_fields'] or 'none'}; "
            f"truncated at {self.max_length} tokens: {r['truncated']['count']}; "
            f"padding by batching: {r['padding']['pad_fraction']} (data.batching={self.batching})"
        )

    def eval_collate(self) -> SFTCollator:
        return SFTCollator(self.tokenizer.pad_token_id)  # validation is always padded, so val/loss compares

    def train_dataloader(self) -> StatefulDataLoader:
        # The same examples make each batch whichever the layout.
        split = self.splits["train"].select_columns(list(self.model_columns))
        padded = SFTCollator(self.tokenizer.pad_token_id)
        if self.batching == "grouped":
            sampler = LengthGroupedSampler(
                self.splits["train"]["num_tokens"], self.batch_size, self.shuffle_seed, **self.shard()
            )
            return self.loader(split, sampler, self.batch_size, padded)
        collate = PackedCollator() if self.batching == "packed" else padded
        return self.loader(split, self.shuffled(split, self.shuffle_seed), self.batch_size, collate)

    def exact_match_records(self) -> list[dict[str, str]]:
        """The held-out examples `val/exact_match` is scored on: the `prompt` as training rendered it (tokenized with
        the tokenizer's special tokens for the Alpaca template, as the chat template's text for the others) and the
        reference `output`."""
        split = self.splits["validation"]
        rows = split.select(range(min(self.exact_match_examples, len(split))))
        return self.prompt_format.held_out_examples(self.tokenizer, rows)
