"""The tokenized-splits cache shared by the SFT and the pair (reward model, DPO) pipelines.

A cache entry is keyed on everything that can change what it holds (the file's bytes, the tokenizer's identity, the
settings and the builder's version), so a second run on the same data and tokenizer loads it in seconds, and any
change builds a new one instead of reading a stale one.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_from_disk

from gpt4llm.io import atomic, json_files


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever the ids a tokenizer produces could change (vocabulary, merges, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if hasattr(tokenizer, "sp_model"):  # SentencePiece: the model file itself, and what is added around it
        body = hashlib.sha256(tokenizer.sp_model.serialized_model_proto()).hexdigest() + json.dumps(
            [sorted(tokenizer.get_added_vocab().items()), tokenizer.special_tokens_pattern]
        )
    elif backend is not None:
        # Truncation and padding are call-time state that the fast tokenizer keeps from its last call: not identity.
        state = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        body = json.dumps(state, sort_keys=True)
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256((type(tokenizer).__name__ + specials + body).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """The digest of a data file, or of every file of a data directory (`datasets`' save_to_disk), names included."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]:
        digest.update(str(file.relative_to(path) if Path(path).is_dir() else "").encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


class DiesWithParent:
    """`function`, run in worker processes that end when the process that started them does: a killed `prepare`
    or `train` leaves no tokenizer workers behind (Linux; elsewhere workers end when their pool's pipe closes)."""

    def __init__(self, function: Callable) -> None:
        self.function, self.parent, self.armed = function, os.getpid(), False

    def __call__(self, *args, **kwargs):
        if not self.armed and os.getpid() != self.parent:
            self.armed = True
            _end_with_parent(self.parent)
        return self.function(*args, **kwargs)


def _end_with_parent(parent: int) -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def tokenize_rows(rows: list[dict], tokenize: Callable, tokenizer, max_length: int, path: Path, **settings) -> Dataset:
    """`tokenize(batch, tokenizer, max_length, **settings)` over the rows read from `path`: batched through the fast
    tokenizer, on every core for a large file."""
    return Dataset.from_list(rows).map(
        DiesWithParent(tokenize),
        batched=True,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, **settings},
        num_proc=os.cpu_count() if len(rows) >= 20_000 else None,  # process start-up costs more than it saves
        desc=f"Tokenizing {path.name}",
    )


@dataclass(frozen=True)
class SplitSettings:
    """What, beside the file and the tokenizer, decides the splits (and so the cache key)."""

    max_length: int
    val_size: int
    split_seed: int = 0
    skip_invalid: bool = False
    template: str = "alpaca"  # data.formats
    train_on: str = "all_assistant"
    template_text: str | None = None  # the chat template itself: the cache keys on the text, not on its name
    pairing: str = "all"  # comparison_data_v2's scored lists as pairs (data.comparisons.PAIRINGS)


def cached_splits(
    kind: str,
    version: int,
    path: Path,
    tokenizer,
    settings: dict[str, Any],
    cache_dir: str | Path,
    build: Callable[[], tuple[DatasetDict, dict[str, Any]]],
) -> tuple[DatasetDict, dict[str, Any]]:
    """The splits and report `build()` makes from `path`, from the cache when they were made before."""
    key = hashlib.sha256(json.dumps([version, file_sha256(path), tokenizer_fingerprint(tokenizer), settings]).encode())
    target = Path(cache_dir) / f"{kind}-{path.stem}-{key.hexdigest()[:20]}"
    if not (target / "report.json").exists():
        splits, report = build()
        with atomic.atomic_path(target) as tmp:  # an interrupted run never leaves a half-written cache
            # datasets cannot save an empty split (data.val_size=0 holds nothing out): left out, and made again below
            DatasetDict({name: split for name, split in splits.items() if len(split)}).save_to_disk(str(tmp / "splits"))
            json_files.write_json(tmp / "report.json", report, indent=2)
    splits, report = load_from_disk(str(target / "splits")), json.loads((target / "report.json").read_text())
    for name in report["splits"]:  # the empty ones, with the columns of the others
        if name not in splits:
            splits[name] = splits["train"].select([])
    return splits, report
