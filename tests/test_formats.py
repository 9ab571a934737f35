"""Instruction data in the formats users have gives the ids the same records give as Alpaca JSON: JSONL, Parquet,
CSV, a `datasets` save_to_disk directory, LLaMA-Factory's Alpaca, single-turn ShareGPT and OpenAI messages. Fields not
used are reported, and records the paper's template cannot hold are counted skips with their reason."""

from __future__ import annotations

import json

import pytest

from gpt4llm.data.cache import SplitSettings
from gpt4llm.data.records import load_instruction_records
from gpt4llm.data.sft_datamodule import build_sft_splits

RECORDS = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat, sleep, move."},
    {"instruction": "Add the numbers.", "input": "12 and 35", "output": "47"},
    {"instruction": "把这个词倒过来写。", "input": "学习", "output": "习学"},
    {"instruction": "Fix:\n    for i in x:\n\tprint(i)", "input": "", "output": "Indent it."},
] * 3  # 12 records, so a split has room; duplicates are skipped the same way in every format
RECORDS = [r | {"output": f"{r['output']} ({i})"} for i, r in enumerate(RECORDS)]


def write(tmp_path, layout: str):
    import datasets

    table = datasets.Dataset.from_list(RECORDS)
    path = tmp_path / f"data.{layout}"
    if layout == "json":
        path.write_text(json.dumps(RECORDS, ensure_ascii=False))
    elif layout == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS))
    elif layout == "parquet":
        table.to_parquet(str(path))
    elif layout == "csv":
        table.to_csv(str(path), index=False)
    elif layout == "saved":
        table.save_to_disk(str(path))
    elif layout == "llama_factory":
        path = tmp_path / "lf.json"
        path.write_text(json.dumps([r | {"system": "", "history": []} for r in RECORDS], ensure_ascii=False))
    elif layout == "sharegpt":
        path = tmp_path / "sharegpt.json"
        path.write_text(
            json.dumps(
                [
                    {
                        "id": i,
                        "conversations": [
                            {"from": "human", "value": r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")},
                            {"from": "gpt", "value": r["output"]},
                        ],
                    }
                    for i, r in enumerate(RECORDS)
                ],
                ensure_ascii=False,
            )
        )
    elif layout == "messages":
        path = tmp_path / "messages.jsonl"
        path.write_text(
            "".join(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")},
                            {"role": "assistant", "content": r["output"]},
                        ]
                    },
                    ensure_ascii=False,
                )
                + "\n"
                for r in RECORDS
            )
        )
    return path


def ids(path, tokenizer, tmp_path):
    splits, report = build_sft_splits(path, tokenizer, SplitSettings(max_length=128, val_size=2), tmp_path / "cache")
    return [splits[s]["input_ids"] for s in ("train", "validation")], report


@pytest.mark.parametrize("layout", ["jsonl", "parquet", "csv", "saved", "llama_factory"])
def test_every_format_gives_the_ids_of_the_alpaca_json(layout, tmp_path, tokenizer):
    expected, _ = ids(write(tmp_path, "json"), tokenizer, tmp_path)
    got, report = ids(write(tmp_path, layout), tokenizer, tmp_path)
    assert got == expected and report["unused_fields"] == {}


@pytest.mark.parametrize("layout", ["sharegpt", "messages"])
def test_chat_layouts_give_the_ids_of_their_alpaca_records(layout, tmp_path, tokenizer):
    # A chat turn has no separate input: the instruction and input joined are the instruction (no-input template).
    joined = [
        {
            "instruction": r["instruction"] + (f"\n\n{r['input']}" if r["input"] else ""),
            "input": "",
            "output": r["output"],
        }
        for r in RECORDS
    ]
    alpaca = tmp_path / "joined.json"
    alpaca.write_text(json.dumps(joined, ensure_ascii=False))
    expected, _ = ids(alpaca, tokenizer, tmp_path)
    got, report = ids(write(tmp_path, layout), tokenizer, tmp_path)
    assert got == expected
    assert report["unused_fields"] == ({"id": len(RECORDS)} if layout == "sharegpt" else {})


def test_what_the_template_cannot_hold_is_a_counted_skip(tmp_path):
    path = tmp_path / "mixed.json"
    path.write_text(
        json.dumps(
            [
                {"instruction": "a", "output": "b", "source": "x"},
                {"instruction": "c", "output": "d", "history": [["hi", "hello"]]},
                {"instruction": "e", "output": "f", "system": "You are terse."},
                {
                    "conversations": [
                        {"from": "human", "value": "g"},
                        {"from": "gpt", "value": "h"},
                        {"from": "human", "value": "i"},
                    ]
                },
                {
                    "messages": [
                        {"role": "system", "content": "s"},
                        {"role": "user", "content": "j"},
                        {"role": "assistant", "content": "k"},
                    ]
                },
            ]
        )
    )
    records, report = load_instruction_records(path)
    summary = report.summary()
    assert [r["index"] for r in records] == [0] and summary["unused_fields"] == {"source": 1}
    assert {reason: s["first_indices"] for reason, s in summary["skipped"].items()} == {
        "has history (earlier turns): the paper's template has no place for it": [1],
        "has a system prompt: the paper's template has no place for it": [2],
        "conversations is not one user turn and one assistant turn (3 turns)": [3],
        "messages has a system turn (the paper's template has none)": [4],
    }


def test_a_hub_dataset_id_is_read_through_datasets(tmp_path, tokenizer, monkeypatch):
    import datasets

    from gpt4llm.data.sft_datamodule import SFTDataModule
    from gpt4llm.errors import DownloadError

    module = SFTDataModule(
        tokenizer, path="someone/alpaca-like", val_size=2, max_length=128, cache_dir=str(tmp_path / "cache")
    )
    with pytest.raises(DownloadError, match="data.path=someone/alpaca-like: read as a Hugging Face hub dataset"):
        module.source_file()  # offline in the tests: said plainly
    seen = []
    monkeypatch.setattr(
        datasets, "load_dataset", lambda name, split: seen.append((name, split)) or datasets.Dataset.from_list(RECORDS)
    )
    got, _ = module.build()
    assert seen == [("someone/alpaca-like", "train")]
    expected, _ = ids(write(tmp_path, "json"), tokenizer, tmp_path)
    assert [got[s]["input_ids"] for s in ("train", "validation")] == expected
