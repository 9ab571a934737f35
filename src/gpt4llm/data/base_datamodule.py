"""The base of the SFT and the pair data modules (reward model and DPO), the pipeline both run:

    file (local, downloaded and checked, or generated) -> validated records -> tokenized, cached train/validation
    splits and a report -> loaders in an epoch-seeded order -> batches

Subclasses say what differs: how a file becomes splits (`build_splits`), the one-line summary, the training loader,
and the collator of validation batches."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import lightning as L
import torch
from datasets import Dataset, DatasetDict
from lightning.pytorch.utilities import rank_zero_info
from torchdata.stateful_dataloader import StatefulDataLoader

from gpt4llm.data.cache import SplitSettings
from gpt4llm.data.formats import resolve_format
from gpt4llm.data.samplers import EpochSampler, InOrderSampler, ShuffledSampler
from gpt4llm.data.sources import ensure_file
from gpt4llm.errors import ConfigError, DownloadError, MissingFileError, RecordError
from gpt4llm.io import json_files

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # owner/name, with no such local path: a dataset on the Hugging Face hub


def hub_snapshot(dataset_id: str, cache_dir: Path, split_name: str = "train") -> Path:
    """A hub dataset's split (downloaded and cached by `datasets`) as a local JSONL file, written once per
    version of the dataset, so the rest of the pipeline reads, checks, caches and reports it like any file."""
    import datasets

    try:
        split = datasets.load_dataset(dataset_id, split=split_name)
    except Exception as err:  # offline, unknown id, no such split: datasets' many error types
        raise DownloadError(
            f"data.path={dataset_id}: read as a Hugging Face hub dataset, whose split {split_name!r} could not be "
            f"loaded ({type(err).__name__}: "
            f"{str(err)[:200]}). Offline, download it elsewhere and point data.path at a local file."
        ) from err
    target = cache_dir / "hub" / dataset_id.replace("/", "__") / f"{split._fingerprint}.jsonl"
    if not target.exists():
        json_files.write_jsonl(target, split.to_list())
    return target


def batches_per_epoch(examples: int, world_size: int, batch_size: int) -> int:
    """Training batches per device per epoch: `examples`, sharded as Lightning's DistributedSampler does (padded to
    equal shards), in batches of `batch_size` (the last one partial). `plan` counts with it too."""
    return math.ceil(math.ceil(examples / world_size) / batch_size)


AUTO_VAL_SHARE, AUTO_VAL_MAX = 0.05, 200  # data.val_size=auto: 5% of what is usable, at most 200


def held_out(val_size: int | str, usable: int) -> int:
    """How many of `usable` records (or prompts) `data.val_size` holds out: a number as given; `auto` 5% of them, at
    least one and at most 200 (a fixed 200 left 7 of 207 conversations to train on)."""
    if val_size == "auto":
        return min(AUTO_VAL_MAX, max(1, round(AUTO_VAL_SHARE * usable))) if usable > 1 else 0
    return int(val_size)


def check_usable(path: Path, usable: int, val_size: int, unit: str, counted: str) -> None:
    """The check both split builders make before holding out: something to train on is left, or a RecordError that
    says how many `unit`s (records, prompts) were usable and why the others were not (`counted`)."""
    if usable == 0:
        raise RecordError(f"{path}: no usable {unit} ({counted}): fix the records, or point data.path at another file")
    if val_size >= usable:
        raise RecordError(
            f"{path}: data.val_size={val_size} leaves no training examples ({counted}): "
            f"set data.val_size below {usable}"
        )


class SplitsDataModule(L.LightningDataModule):
    """Records from one file as cached splits (`self.splits`, `self.report`) and batches of `batch_size` examples.

    Loaders take their order from gpt4llm.data.samplers, sharded over the run's processes here (the trainers run
    with `use_distributed_sampler: false`). The training loaders are torchdata's StatefulDataLoader: Lightning saves
    their position in each checkpoint and restores it before the first batch of a resumed run, so a run resumed
    mid-epoch continues with the very batches it would have seen. That holds as long as nothing builds the loader
    before the checkpoint is restored (Lightning then drops the position, Lightning-AI/pytorch-lightning#20550, and
    DeepSpeed restores only after setup): the LR schedule's length comes from `batches_per_epoch`, not from
    `trainer.estimated_stepping_batches`.
    """

    required_fields: tuple[str, ...] = ()  # what every record of a downloaded file must have
    model_columns: tuple[str, ...] = ()  # the columns a batch is made of
    missing_file_hint = "Point data.path at your data file (.json or .jsonl)."

    def __init__(
        self,
        tokenizer,
        path: str,
        url: str | None = None,
        checksum: str | None = None,
        num_records: int | None = None,
        demo: dict | None = None,
        max_length: int = 512,
        val_size: int = 200,
        split_seed: int = 0,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        skip_invalid: bool = False,
        cache_dir: str = "data/cache",
        template: str = "alpaca",
        train_on: str = "all_assistant",
        split: str | None = None,
    ) -> None:
        super().__init__()
        # data.formats: records to ids, held-out prompts (`auto` decided against this tokenizer)
        self.prompt_format = resolve_format(template, tokenizer, train_on).format
        self.tokenizer = tokenizer
        self.path, self.url, self.checksum, self.num_records, self.demo = Path(path), url, checksum, num_records, demo
        self.max_length, self.val_size, self.split_seed = max_length, val_size, split_seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.skip_invalid, self.cache_dir = num_workers, skip_invalid, cache_dir
        self.split = split  # of a save_to_disk DatasetDict or a hub dataset; None: "train"
        self.splits: DatasetDict | None = None
        self.report: dict[str, Any] | None = None

    # --- what subclasses say ---
    def write_demo(self, path: Path, **settings) -> Path:
        raise NotImplementedError

    def build_splits(self, file: Path) -> tuple[DatasetDict, dict[str, Any]]:
        raise NotImplementedError

    def summary(self) -> str:
        raise NotImplementedError

    def eval_collate(self):
        raise NotImplementedError

    # --- the pipeline ---
    def source_file(self) -> Path:
        if self.demo is not None and not self.path.exists():
            return self.write_demo(self.path, **self.demo)
        if not self.url and not self.path.exists() and HUB_ID.match(str(self.path)):
            return hub_snapshot(str(self.path), Path(self.cache_dir), self.split or "train")
        if not self.url and not self.path.exists():
            raise MissingFileError(f"data.path={self.path}: no such file. {self.missing_file_hint}")
        if (self.path / "dataset_dict.json").is_file():
            return self.saved_split()
        if self.split is not None:
            raise ConfigError(
                f"data.split={self.split}: data.path={self.path} has no splits to choose from (only a save_to_disk "
                f"DatasetDict or a hub dataset has): remove data.split"
            )
        return ensure_file(
            self.path,
            self.url,
            checksum=self.checksum,
            num_records=self.num_records,
            required_fields=self.required_fields,
            setting="data.path",
        )

    def saved_split(self) -> Path:
        """The directory of the split to use in a DatasetDict written by save_to_disk (`datasets` keeps each split
        in a subdirectory named after it, listed in dataset_dict.json): data.split, else "train". Without "train" the
        split must be named: taking whichever split is there would train on validation or test data."""
        splits = json.loads((self.path / "dataset_dict.json").read_text())["splits"]
        name = self.split or "train"
        if name not in splits:
            setting = f"data.split={name}" if self.split else "data.split is not set and"
            raise ConfigError(
                f"{setting} data.path={self.path} has no split {name!r}: its splits are {', '.join(splits)}; "
                f"set data.split to the one to train on"
            )
        return self.path / name

    def split_settings(self) -> SplitSettings:
        fmt = self.prompt_format
        return SplitSettings(
            self.max_length,
            self.val_size,
            self.split_seed,
            self.skip_invalid,
            fmt.name,
            fmt.train_on,
            fmt.template_text(self.tokenizer),
        )

    def build(self) -> tuple[DatasetDict, dict[str, Any]]:
        return self.build_splits(self.source_file())

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits, self.report = self.build()
            rank_zero_info(self.summary())

    def val_dataloader(self) -> StatefulDataLoader:
        split = self.splits["validation"].select_columns(list(self.model_columns))
        return self.loader(split, self.in_order(split), self.eval_batch_size, self.eval_collate())

    def prepare_data(self) -> None:
        self.build()  # downloads and tokenizes once per node; `setup` then reads the cache on every rank

    def batches_per_epoch(self, world_size: int) -> int:
        """Training batches per device per epoch (call after `setup`)."""
        return batches_per_epoch(len(self.splits["train"]), world_size, self.batch_size)

    def shard(self) -> dict[str, int]:
        """This process's place in the run (one process when not training, e.g. `prepare`)."""
        trainer = self.trainer  # Lightning's attribute; None until the data module is given to a trainer
        return {"rank": trainer.global_rank, "world_size": trainer.world_size} if trainer is not None else {}

    def shuffled(self, split: Dataset, seed: int) -> ShuffledSampler:
        return ShuffledSampler(len(split), seed, **self.shard())

    def in_order(self, split: Dataset) -> InOrderSampler:
        return InOrderSampler(len(split), **self.shard())

    def loader(self, split: Dataset, sampler: EpochSampler, batch_size: int, collate) -> StatefulDataLoader:
        # Each iterator over a loader draws its workers' seed from `generator`; without one, from torch's global
        # generator, which dropout draws from too: a resumed run, whose generators are put back from the checkpoint
        # (training.callbacks.RandomState), would then draw other masks after an epoch's end or a validation.
        generator = torch.Generator()
        generator.manual_seed(sampler.seed)
        return StatefulDataLoader(
            split,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            generator=generator,
        )
