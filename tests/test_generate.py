"""Generation mechanics on the tiny random model (its answers are noise; what they are does not matter here):
batches answer as one-by-one runs do, a rerun skips what is written; and the generate -> evaluate -> plots commands
end to end. The engine's own oracle tests (stop ids, stop strings, limits, seeds): tests/test_engine.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from gpt4llm.data.demo import make_demo_records
from gpt4llm.data.prompts import format_prompt
from gpt4llm.inference.resumable_generation import generate_to_file
from gpt4llm.models.decoding import generate_responses

RECORDS = make_demo_records(6, seed=7)
GREEDY = {"max_new_tokens": 8, "do_sample": False, "num_samples": 1}


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    # One thread: a 64-wide model gains nothing from more, and on a busy 2-core machine thread sync costs 100x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.set_num_threads(threads)


def test_batched_left_padded_greedy_equals_one_by_one(model, tokenizer):
    lengths = {len(tokenizer(format_prompt(r["instruction"], r["input"]))["input_ids"]) for r in RECORDS}
    assert len(lengths) > 1, "the prompts must differ in length for padding to matter"
    batched = generate_responses(model, tokenizer, RECORDS, max_new_tokens=8, batch_size=6)
    alone = [generate_responses(model, tokenizer, [r], max_new_tokens=8, batch_size=1)[0] for r in RECORDS]
    assert batched == alone
    assert all(batched)


def test_rerun_skips_written_ids_and_a_torn_line(model, tokenizer, tmp_path):
    records = [
        {"id": f"q{i}", "instruction": r["instruction"], "input": r["input"], "reference": r["output"]}
        for i, r in enumerate(RECORDS)
    ]
    path = tmp_path / "responses.jsonl"
    counts = generate_to_file(
        model, tokenizer, records, path, GREEDY, batch_size=4, extra={"model": "tiny"}, progress=None
    )
    assert counts["generated"] == 6
    full = path.read_text().splitlines()
    first = json.loads(full[0])
    assert set(first) >= {"id", "prompt", "response", "reference", "decoding", "model", "finish_reason", "num_tokens"}
    assert first["decoding"] == GREEDY and first["model"] == "tiny"

    path.write_text("\n".join(full[:2]) + "\n" + full[2][: len(full[2]) // 2])  # killed while writing line 3
    counts = generate_to_file(
        model, tokenizer, records, path, GREEDY, batch_size=4, extra={"model": "tiny"}, progress=None
    )
    assert (counts["already_done"], counts["generated"]) == (2, 4)
    again = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(r["id"] for r in again) == sorted(r["id"] for r in records)
    assert {r["id"]: r["response"] for r in again} == {json.loads(x)["id"]: json.loads(x)["response"] for x in full}

    assert generate_to_file(model, tokenizer, records, path, GREEDY, progress=None)["generated"] == 0
    with pytest.raises(ValueError, match="generated with decoding="):
        generate_to_file(model, tokenizer, records, path, GREEDY | {"max_new_tokens": 9}, progress=None)


def test_sampling_n_answers_per_question(model, tokenizer, tmp_path):
    decoding = {"max_new_tokens": 6, "do_sample": True, "num_samples": 3, "temperature": 1.5, "top_p": 1.0}
    torch.manual_seed(0)
    generate_to_file(
        model,
        tokenizer,
        [{"id": 1, "instruction": "Say hi.", "input": ""}],
        tmp_path / "r.jsonl",
        decoding,
        progress=None,
    )
    (line,) = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(line["responses"]) == 3 and line["response"] == line["responses"][0]
    assert len(set(line["responses"])) > 1, "three samples at temperature 1.5 of a random model should differ"


@pytest.mark.slow
def test_generate_evaluate_plots_commands(tiny_model_dir, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")

    def run(module, *args):
        proc = subprocess.run(
            [sys.executable, "-m", module, *args, f"paths.log_dir={tmp_path / 'logs'}"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        return proc.stdout

    gen = [
        f"model.path={tiny_model_dir}",
        "model.name=tiny",
        "eval=demo",
        "eval.demo.num_records=8",
        "decoding.max_new_tokens=6",
    ]
    assert "8 new, 0 already there" in run("gpt4llm.generate", *gen)
    assert "0 new, 8 already there" in run("gpt4llm.generate", *gen)  # the same command again: nothing to redo
    responses = tmp_path / "logs" / "generate" / "demo" / "tiny" / "responses.jsonl"
    assert len(responses.read_text().splitlines()) == 8

    out = run("gpt4llm.evaluate", "metric=rouge", f"responses={responses}")
    assert "| ALL | tiny | 8 |" in out
    [table] = (tmp_path / "logs" / "evaluate" / "runs").glob("*/rouge_lenALL.json")
    assert json.loads(table.read_text())[0]["NumInstance"] == 8

    out = run("gpt4llm.plots", f"results={tmp_path / 'logs'}")
    assert "bar_unnatural.png" in out and "cmp_seq_len_freq.png" in out and "not drawn: Figure 2" in out
