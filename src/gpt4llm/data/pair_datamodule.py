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
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import DatasetDict
from torchdata.stateful_dataloader import StatefulDataLoader

from gpt4llm.data.base_datamodule import SplitsDataModule, check_usable
from gpt4llm.data.cache import SplitSettings, cached_splits, tokenize_rows
from gpt4llm.data.collators import PairCollator
from gpt4llm.data.comparisons import PAIRINGS, read_comparison_pairs
from gpt4llm.data.demo_pairs import write_demo_pairs_file
from gpt4llm.data.encoding import encode_responses, encode_truncated
from gpt4llm.data.samplers import InOrderSampler
from gpt4llm.data.templates import render
from gpt4llm.data.tokenizer import describe
from gpt4llm.errors import ConfigError

CACHE_VERSION = 2  # bump when parsing, tokenization or the split change what the cache holds


def tokenize_pairs(batch: dict[str, list], tokenizer, max_length: int, template: str = "alpaca") -> dict[str, list]:
    """`datasets.map(batched=True)` function: pairs -> chosen/rejected ids, how many of each sequence's first tokens
    are the prompt (`*_prompt_tokens`: DPO sums log-probabilities over the rest), and audit columns. With a chat
    template the prompt is a conversation (JSON) and each response its final assistant turn, rendered whole."""
    if template == "alpaca":
        chosen, chosen_len = encode_responses(tokenizer, batch["prompt"], batch["chosen"], max_length)
        rejected, rejected_len = encode_responses(tokenizer, batch["prompt"], batch["rejected"], max_length)
        # the prompt tokenized alone, as SFT's labels mask it (data.sft_examples)
        prompt_ids = tokenizer(batch["prompt"], max_length=max_length, truncation=True)["input_ids"]
        prompt_len = [len(ids) for ids in prompt_ids]
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
        # what the template writes before the answer: the conversation and its generation prompt
        prefixes = render(tokenizer, prompts, add_generation_prompt=True)
        prompt_len = [len(ids) for ids in tokenizer(prefixes, add_special_tokens=False)["input_ids"]]
    return {
        "chosen_input_ids": chosen,
        "rejected_input_ids": rejected,
        "chosen_prompt_tokens": [min(n, len(ids)) for n, ids in zip(prompt_len, chosen)],
        "rejected_prompt_tokens": [min(n, len(ids)) for n, ids in zip(prompt_len, rejected)],
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
    """Comparison records from one file (local, downloaded, or the generated demo) as batches of pairs: for the reward
    model, and for preference optimisation (task=dpo), which also reads the labels (the response tokens) and, when
    the reference is precomputed, the reference's log-probabilities (`set_reference_logps`)."""

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
        self.reference_columns: tuple[str, ...] = ()
        self.reference_logps: dict[str, torch.Tensor] = {}

    def split_settings(self) -> SplitSettings:
        return replace(super().split_settings(), pairing=self.pairing)

    def set_reference_logps(self, split: str, chosen: list[float], rejected: list[float]) -> None:
        """The reference model's log-probabilities of each pair's responses (DPO's precomputed reference): kept here
        in fp32 as `reference_logps[split]` (pairs x [chosen, rejected]), found by the `pair_index` each batch carries.
        Not in the batches themselves: Lightning casts a batch's floating tensors to the 16-bit dtype under
        DeepSpeed's and the true-half precisions, and a sum of a hundred log-probabilities in bf16 is a quarter nat
        off."""
        self.reference_logps[split] = torch.tensor([chosen, rejected], dtype=torch.float32).T.contiguous()
        if "pair_index" not in self.splits[split].column_names:
            self.splits[split] = self.splits[split].add_column("pair_index", list(range(len(self.splits[split]))))
        self.reference_columns = ("pair_index",)

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
        )

    def columns(self, split: str) -> list[str]:
        return [*self.model_columns, *(c for c in self.reference_columns if c in self.splits[split].column_names)]

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
        """The split in file order, padded, for the reference pass (no reference columns yet)."""
        data = self.splits[split].select_columns(list(self.model_columns))
        return self.loader(data, InOrderSampler(len(data)), batch_size, self.eval_collate())
