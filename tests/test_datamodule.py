"""The shared data path: file -> records -> tokenized cached splits -> batches, and its audit report."""

from __future__ import annotations

import json

import pytest

from gpt4llm.data.cache import SplitSettings
from gpt4llm.data.encoding import IGNORE_INDEX
from gpt4llm.data.formats.alpaca import AlpacaFormat
from gpt4llm.data.sft_datamodule import SFTDataModule, build_sft_splits


def records_file(tmp_path, n=30):
    records = [
        {"instruction": f"Repeat the number {i}.", "input": "" if i % 2 else f"n={i}", "output": str(i)}
        for i in range(n)
    ]
    records.append(dict(records[0]))  # a duplicate
    records.append({"instruction": "Nothing to say.", "input": "", "output": ""})
    records.append({"instruction": "Long prompt. " * 60, "input": "", "output": "x"})  # the prompt fills max_length
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records))
    return path


def test_splits_report_and_cache(tmp_path, tokenizer, monkeypatch):
    path = records_file(tmp_path)
    splits, report = build_sft_splits(path, tokenizer, SplitSettings(max_length=128, val_size=5), tmp_path / "cache")
    assert report["records"] == 33 and report["usable"] == 30
    assert {k: v["count"] for k, v in report["skipped"].items()} == {
        "duplicate record": 1,
        "empty output": 1,
        "prompt fills max_length": 1,
    }
    assert report["skipped"]["prompt fills max_length"]["first_indices"] == [32]
    assert report["splits"] == {"train": 25, "validation": 5}
    assert report["missing_eos_label"]["count"] == 0 and report["truncated"]["count"] == 1
    assert 0 < report["supervised_token_fraction"] < 0.5
    assert set(splits["train"]["index"]).isdisjoint(splits["validation"]["index"])

    # Same file, tokenizer and settings: read back from the cache, nothing is tokenized again.
    monkeypatch.setattr(AlpacaFormat, "tokenize_examples", lambda *a, **k: pytest.fail("tokenized twice"))
    again, report_again = build_sft_splits(
        path, tokenizer, SplitSettings(max_length=128, val_size=5), tmp_path / "cache"
    )
    assert report_again == report and again["train"]["input_ids"] == splits["train"]["input_ids"]
    assert not list((tmp_path / "cache").glob("*.tmp-*"))


def test_batches_from_the_datamodule(tmp_path, tokenizer):
    dm = SFTDataModule(
        tokenizer,
        path=str(records_file(tmp_path)),
        max_length=128,
        val_size=5,
        batch_size=4,
        cache_dir=str(tmp_path / "c"),
    )
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "attention_mask"} and batch["input_ids"].shape[0] == 4
    assert (batch["labels"] != IGNORE_INDEX).any(dim=1).all()
    assert len(list(dm.val_dataloader())) == 2  # 5 examples in batches of 4


def test_missing_local_file_says_where_to_put_it(tmp_path, tokenizer):
    dm = SFTDataModule(tokenizer, path=str(tmp_path / "mine.json"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(Exception, match="data.path") as err:
        dm.prepare_data()
    assert str(tmp_path / "mine.json") in str(err.value)
