"""The prompts online RL (task=grpo|rloo) samples completions for: any data file the other tasks read, its prompts
only, rendered with the policy's template.

A record gives its prompt by any of these layouts (the first that fits):
    instruction, input?, output?          the paper's GPT-4 instructions (output: a reference, for reward functions)
    user_input | prompt (a string)        comparison_data_v2's prompts, or plain prompts
    messages | conversations              a conversation; a final assistant turn is dropped (its text kept as output)

Each prompt is rendered as the SFT data would render it (data.formats), tokenized, and skipped and counted when longer
than `max_prompt_length` (said in the summary at start). Held out: `val_size` prompts, answered at each validation.
A batch is `batch_size` prompts: the rows' rendered prompt, its ids, the text reward functions and judges read
(`user_text`), the record the reward model scores (`score_record`) and the record's own fields.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict
from torchdata.stateful_dataloader import StatefulDataLoader

from gpt4llm.data.base_datamodule import SplitsDataModule, batches_per_epoch, check_usable, held_out
from gpt4llm.data.cache import cached_splits
from gpt4llm.data.conversations import (
    CONVERSATION_KEYS,
    RecordProblem,
    TurnProblem,
    alpaca_user_text,
    check_turns,
    read_conversation,
)
from gpt4llm.data.formats import FormatProblem
from gpt4llm.data.records import read_records
from gpt4llm.data.samplers import RepeatedBlocksSampler
from gpt4llm.data.tokenizer import describe
from gpt4llm.errors import RecordError

CACHE_VERSION = 2  # bump when what build_prompt_splits produces changes
TOO_LONG = "prompt longer than max_prompt_length"
# the data keys of the SFT and pair configs that mean nothing for prompts (a data=alpaca_gpt4 config serves RL too)
NOT_FOR_PROMPTS = ("exact_match_examples", "batching", "attn_implementation", "pairing", "packed", "required_fields")


def prompt_of(record: Any) -> tuple[list[dict[str, str]] | None, dict, str]:
    """(the conversation to answer, or None for an Alpaca instruction; the record a reward model scores; the text a
    reward function reads as the prompt), or a RecordProblem saying why the record has no prompt."""
    if not isinstance(record, dict):
        raise RecordProblem(f"is a JSON {type(record).__name__}, not an object")
    if "instruction" in record:
        instruction, input_ = record["instruction"], record.get("input") or ""
        if not isinstance(instruction, str) or not isinstance(input_, str) or not instruction.strip():
            raise RecordProblem("field 'instruction' (or 'input') is not a non-empty string")
        return None, {"instruction": instruction, "input": input_}, alpaca_user_text(instruction, input_)
    for key in ("user_input", "prompt"):
        if isinstance(record.get(key), str):
            if not record[key].strip():
                raise RecordProblem(f"field '{key}' is empty")
            return [{"role": "user", "content": record[key]}], {"prompt": record[key]}, record[key]
    if any(k in record for k in CONVERSATION_KEYS):
        messages = read_conversation(record).messages
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        try:
            check_turns(messages, final="user")
        except TurnProblem as problem:
            raise RecordProblem(str(problem)) from None
        return messages, {"prompt": messages[-1]["content"]}, messages[-1]["content"]
    raise RecordProblem("has no prompt: give 'instruction' (and 'input'), 'prompt', 'user_input' or 'messages'")


def reference_of(record: dict) -> str | None:
    """A record's reference answer, for reward functions (`output`): its output, or a conversation's last answer."""
    if isinstance(record.get("output"), str):
        return record["output"]
    if any(k in record for k in CONVERSATION_KEYS):
        messages = read_conversation(record).messages
        if messages and messages[-1]["role"] == "assistant":
            return messages[-1]["content"]
    return None


def build_prompt_splits(
    path: Path, tokenizer, prompt_format, max_prompt_length: int, val_size, split_seed: int, skip_invalid: bool
) -> tuple[DatasetDict, dict[str, Any]]:
    records = read_records(path)
    rows, skipped = [], {}
    for i, record in enumerate(records):
        try:
            conversation, score_record, user_text = prompt_of(record)
            if conversation is None:
                prompt = prompt_format.record_prompts(tokenizer, [score_record])[0]
            else:
                prompt = prompt_format.chat_prompt(tokenizer, conversation)
        except (RecordProblem, FormatProblem) as problem:
            if not skip_invalid:
                raise RecordError(
                    f"{path}: record {i} {problem}; fix it, or set data.skip_invalid=true to skip and count such "
                    f"records"
                ) from None
            skipped.setdefault(str(problem), []).append(i)
            continue
        ids = tokenizer(prompt, add_special_tokens=prompt_format.add_special_tokens)["input_ids"]
        if len(ids) > max_prompt_length:
            skipped.setdefault(TOO_LONG, []).append(i)
            continue
        fields = {k: v for k, v in record.items() if k not in CONVERSATION_KEYS}
        reference = reference_of(record)
        if reference is not None:
            fields["output"] = reference
        rows.append(
            {
                "index": i,
                "prompt": prompt,
                "input_ids": ids,
                "num_tokens": len(ids),
                "user_text": user_text,
                "score_record": json.dumps(score_record, ensure_ascii=False),
                "fields": json.dumps(fields, ensure_ascii=False, default=str),
            }
        )
    counted = f"{len(rows)} usable of {len(records)} records; skipped: " + (
        ", ".join(f"{reason}: {len(ix)}" for reason, ix in skipped.items()) or "none"
    )
    held = held_out(val_size, len(rows))
    check_usable(path, len(rows), held, "prompts", counted)
    order = random.Random(split_seed).sample(range(len(rows)), len(rows))
    table = Dataset.from_list(rows)
    splits = DatasetDict(train=table.select(sorted(order[held:])), validation=table.select(sorted(order[:held])))
    lengths = sorted(r["num_tokens"] for r in rows)
    report = {
        "file": str(path),
        "tokenizer": describe(tokenizer),
        "records": len(records),
        "usable": len(rows),
        "max_prompt_length": max_prompt_length,
        "skipped": {reason: {"count": len(ix), "first_indices": ix[:10]} for reason, ix in skipped.items()},
        "splits": {name: len(split) for name, split in splits.items()},
        "prompt_tokens": {"p50": lengths[len(lengths) // 2], "max": lengths[-1]},
        "template": prompt_format.name,
    }
    return splits, report


class PromptCollator:
    """A batch of prompts: `index` (their rows in the split, a tensor) and each row as a dict (lists and text, left
    on the CPU by Lightning's device transfer)."""

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        return {"index": torch.tensor([r["index"] for r in rows]), "rows": rows}


class PromptDataModule(SplitsDataModule):
    """Prompt records from one file, in batches of `batch_size` prompts; each block of `batch_size x
    accumulate` prompts is yielded `num_iterations` times in a row (samplers.RepeatedBlocksSampler)."""

    model_columns = ("index", "prompt", "input_ids", "user_text", "score_record", "fields")
    audit_columns = ("index", "prompt", "input_ids")
    missing_file_hint = (
        "Point data.path at a file of prompts (.json or .jsonl): instruction records, prompts or conversations."
    )

    def __init__(
        self,
        *args,
        max_prompt_length: int = 256,
        num_iterations: int = 1,
        accumulate: int = 1,
        shuffle_seed: int | None = None,
        **kwargs,
    ) -> None:
        for key in NOT_FOR_PROMPTS:
            kwargs.pop(key, None)
        super().__init__(*args, **kwargs)
        self.max_prompt_length, self.num_iterations, self.accumulate = max_prompt_length, num_iterations, accumulate
        self.shuffle_seed = self.split_seed if shuffle_seed is None else shuffle_seed

    def write_demo(self, path: Path, **settings) -> Path:
        from gpt4llm.data.demo import write_demo_file

        return write_demo_file(path, **settings)

    def build_splits(self, file: Path) -> tuple[DatasetDict, dict[str, Any]]:
        settings = asdict(self.split_settings()) | {"max_prompt_length": self.max_prompt_length}

        def build():
            return build_prompt_splits(
                file,
                self.tokenizer,
                self.prompt_format,
                self.max_prompt_length,
                self.val_size,
                self.split_seed,
                self.skip_invalid,
            )

        return cached_splits("prompts", CACHE_VERSION, file, self.tokenizer, settings, self.cache_dir, build)

    def summary(self) -> str:
        r = self.report
        skipped = {reason: s["count"] for reason, s in r["skipped"].items()}
        return (
            f"Prompts {r['file']}: {r['splits']} of {r['records']} records, template {r['template']}; "
            f"ids by {r['tokenizer']['backend']}; "
            f"skipped {skipped or 'none'} (max_prompt_length {r['max_prompt_length']}); "
            f"prompt tokens p50 {r['prompt_tokens']['p50']}, max {r['prompt_tokens']['max']}"
        )

    def eval_collate(self) -> PromptCollator:
        return PromptCollator()

    def sampler(self, split: Dataset) -> RepeatedBlocksSampler:
        block = self.batch_size * self.accumulate
        return RepeatedBlocksSampler(len(split), self.shuffle_seed, block, self.num_iterations, **self.shard())

    def train_dataloader(self) -> StatefulDataLoader:
        split = self.splits["train"].select_columns(list(self.model_columns))
        return self.loader(split, self.sampler(split), self.batch_size, PromptCollator())

    def batches_per_epoch(self, world_size: int) -> int:
        shard = batches_per_epoch(len(self.splits["train"]), world_size, 1)  # prompts per rank
        block = self.batch_size * self.accumulate
        return -(-shard // block) * block * self.num_iterations // self.batch_size
