"""Data read as it is or refused with one line (issue 28, items 12, 16, 17 and 18): CSV cells are text, a saved
DatasetDict's split is named, files with nothing usable in them say so, a missing model directory is said as one,
and offline nothing is downloaded."""

from __future__ import annotations

import json
import urllib.request

import pytest

from gpt4llm.data.records import load_instruction_records, read_records
from gpt4llm.data.sources import ensure_file
from gpt4llm.data.tokenizer import check_model_dir, load_tokenizer, looks_local
from gpt4llm.errors import ConfigError, DownloadError, MissingFileError, RecordError

GOOD = [{"instruction": f"Say {i}.", "input": "", "output": f"answer {i}"} for i in range(12)]
MISSING_WORDS = ["None", "NA", "N/A", "null", "nan", "NaN", "#N/A", ""]


def test_csv_cells_that_pandas_would_call_missing_are_text(tmp_path):
    import pandas as pd

    rows = [{"instruction": f"Echo {w!r}.", "input": w, "output": w or "(empty)"} for w in MISSING_WORDS]
    rows.append({"instruction": "Add 12 and 35.", "input": "", "output": "47"})  # a number is text too
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    records, report = load_instruction_records(tmp_path / "d.csv")
    assert [{k: r[k] for k in ("instruction", "input", "output")} for r in records] == rows
    assert report.skipped == {}


def saved(tmp_path, **splits):
    import datasets

    path = tmp_path / "saved"
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(path))
    return path


def module(tokenizer, tmp_path, path, **kwargs):
    from gpt4llm.data.sft_datamodule import SFTDataModule

    return SFTDataModule(
        tokenizer, path=str(path), val_size=1, max_length=64, cache_dir=str(tmp_path / "cache"), **kwargs
    )


def test_a_saved_datasetdict_without_train_needs_data_split(tmp_path, tokenizer):
    path = saved(tmp_path, validation=GOOD[:6], test=GOOD[6:])
    with pytest.raises(ConfigError) as err:
        module(tokenizer, tmp_path, path).build()
    assert str(err.value) == (
        f"data.split is not set and data.path={path} has no split 'train': its splits are validation, test; "
        f"set data.split to the one to train on"
    )
    with pytest.raises(RecordError, match=r"saved splits validation, test, none of them 'train': set data.split"):
        read_records(path)  # analyze and plots read files without the data module
    splits, report = module(tokenizer, tmp_path, path, split="test").build()
    assert report["records"] == 6 and report["file"] == str(path / "test")
    with pytest.raises(
        ConfigError, match=r"^data.split=dev data.path=.* has no split 'dev': its splits are validation"
    ):
        module(tokenizer, tmp_path, path, split="dev").build()


def test_a_saved_datasetdict_with_train_trains_on_train(tmp_path, tokenizer):
    path = saved(tmp_path, train=GOOD[:8], test=GOOD[8:])
    _, report = module(tokenizer, tmp_path, path).build()
    assert report["records"] == 8 and report["file"] == str(path / "train")


def test_data_split_on_a_plain_file_is_refused(tmp_path, tokenizer):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(GOOD))
    with pytest.raises(ConfigError, match=r"^data.split=test: data.path=.*d.json has no splits to choose from"):
        module(tokenizer, tmp_path, path, split="test").build()


def bad_file(tmp_path, name: str):
    import datasets

    path = tmp_path / name
    if name == "zero_bytes.parquet":
        path.write_bytes(b"")
    elif name == "no_rows.parquet":
        datasets.Dataset.from_list(GOOD).select([]).to_parquet(str(path))
    elif name == "empty.csv":
        path.write_text("")
    elif name == "header_only.csv":
        path.write_text("instruction,input,output\n")
    elif name == "latin1.csv":
        path.write_bytes("instruction,input,output\nCafé?,,Sí señor.\n".encode("latin-1"))
    elif name == "empty_list.json":
        path.write_text("[]")
    elif name == "all_skipped.json":
        path.write_text(json.dumps([{"instruction": " ", "output": "x"}, {"instruction": "a", "output": ""}]))
    return path


BAD_FILES = {
    "zero_bytes.parquet": "not a readable Parquet file (Could not open Parquet input source '{path}': Parquet file "
    "size is 0 bytes): write it again, or convert it to JSONL",
    "no_rows.parquet": "holds no records: put the records in it, or point data.path at another file",
    "empty.csv": "an empty file: write a header line (instruction,input,output) and one row per record",
    "header_only.csv": "holds no records: put the records in it, or point data.path at another file",
    "latin1.csv": "not UTF-8 text (utf-8 decoding failed: invalid continuation byte): save it as UTF-8 "
    "(e.g. iconv -f latin1 -t utf-8 latin1.csv > utf8_latin1.csv)",
    "empty_list.json": "holds no records: put the records in it, or point data.path at another file",
    "all_skipped.json": "none of its 2 records can be used (empty instruction: 1; empty output: 1): fix them, "
    "or point data.path at another file",
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_a_file_with_nothing_usable_is_one_record_error(tmp_path, name):
    path = bad_file(tmp_path, name)
    with pytest.raises(RecordError) as err:
        load_instruction_records(path, skip_invalid=True)
    assert str(err.value) == f"{path}: " + BAD_FILES[name].format(path=path)


@pytest.mark.parametrize(
    "path, local",
    [
        ("/models/llama", True),
        ("./export", True),
        ("../runs/export", True),
        ("~/models/x", True),
        ("runs/sft/export", True),  # more parts than a hub id has
        ("facebook/opt-1.3b", False),
        ("gpt2", False),
    ],
)
def test_what_looks_like_a_local_path(path, local):
    assert looks_local(path) is local


def test_a_path_under_an_existing_directory_is_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    assert looks_local("outputs/model") and not looks_local("someone/model")


def test_a_missing_model_directory_is_said_as_one(tmp_path, tiny_model_dir):
    missing = tmp_path / "no_model"
    with pytest.raises(MissingFileError) as err:
        load_tokenizer(str(missing))
    assert str(err.value) == (
        f"{missing}: no such model directory. Check the path: it should be a directory with config.json "
        f"(a run's export/ directory), or a hub model's id (owner/name)"
    )
    check_model_dir(tiny_model_dir)  # there: nothing to say
    check_model_dir("someone/model")  # a hub id: transformers' to fetch


def test_load_causal_lm_says_the_directory_is_missing(tmp_path, tokenizer):
    from gpt4llm.models.hf import load_causal_lm

    with pytest.raises(MissingFileError, match=r"no_model: no such model directory"):
        load_causal_lm(str(tmp_path / "no_model"), tokenizer)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a connection was tried while offline")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    for name in ("GPT4LLM_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("switch", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "GPT4LLM_OFFLINE"])
def test_offline_nothing_is_downloaded_and_the_error_says_where_to_put_it(tmp_path, monkeypatch, no_network, switch):
    monkeypatch.setenv(switch, "1")
    target = tmp_path / "prompt.jsonl"
    url = "https://raw.githubusercontent.com/lm-sys/FastChat/x/prompt.jsonl"
    with pytest.raises(DownloadError) as err:
        ensure_file(target, url, setting="metric.fastchat.prompts.path")
    assert str(err.value) == (
        f"{target} is missing, and {switch} is set, so it is not downloaded from {url}. "
        f"Copy the file to {target}, or set metric.fastchat.prompts.path=/path/to/prompt.jsonl."
    )
    assert not target.exists()


def test_offline_eval_sets_name_eval_path(tmp_path, monkeypatch, no_network):
    from gpt4llm.evaluation.eval_sets import load_eval_set

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    target = tmp_path / "vicuna_question_80.jsonl"
    with pytest.raises(DownloadError, match=r"HF_HUB_OFFLINE is set, .* or set eval.path=/path/to/vicuna_question_80"):
        load_eval_set("vicuna", str(target), "https://example.com/question.jsonl", num_records=80)


def test_offline_switch_off_is_not_offline(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(AssertionError, match="a connection was tried"):
        ensure_file(tmp_path / "d.json", "https://example.com/d.json", attempts=1)
