"""`gpt4llm.synthesize` against real HTTP servers on 127.0.0.1: a teacher that answers with rate limits, timeouts,
cut-off answers, failures and unparsable scores on cue (retries, the report's lists, resume after a kill, the key
never written), and `gpt4llm.serve` with the tiny model (the whole loop offline: answer, translate, score, judge)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import gpt4llm.synthesize as S
from gpt4llm.data.prompts import format_prompt
from helpers.configs import CONF, synth_cfg
from helpers.fake_servers import Teacher
from helpers.runs import write

KEY = "sk-teacher-NEVER-WRITE-THIS-4242"


@pytest.fixture
def teacher(loopback):
    return lambda **kwargs: loopback(Teacher, **kwargs)


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("SYNTH_TEST_KEY", KEY)
    return KEY


def assert_key_nowhere(root: Path, *texts: str):
    written = [p for p in root.rglob("*") if p.is_file() and KEY in p.read_text(errors="replace")]
    assert not written, f"the API key was written to {written}"
    assert not any(KEY in t for t in texts), "the API key was printed"


INSTRUCTIONS = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "old answer"},
    {"instruction": "Sort the numbers.", "input": "3, 1, 2"},
    {"instruction": "CUE:429 Name a color."},
    {"instruction": "CUE:slow Name a fruit.", "input": ""},
    {"instruction": "CUE:length Write a long story.", "input": ""},
    {"instruction": "CUE:fail Say hi.", "input": ""},
    {"instruction": "Give three tips for staying healthy.", "input": ""},  # the same prompt again: its own draw
    {"instruction": "  ", "input": ""},
]


def test_answer_uses_the_papers_settings_retries_lists_problems_and_reruns_for_free(
    teacher, key, tmp_path, capsys, caplog
):
    srv = teacher()
    cfg = synth_cfg(tmp_path, srv.base_url, "job=answer", f"instructions={write(tmp_path / 'seed.json', INSTRUCTIONS)}")
    report = S.synthesize(cfg)

    # The paper's Algorithm 1: the Alpaca prompt as the one user message, temperature 1, top_p 1, 512 tokens.
    first = next(r for r in srv.requests if "healthy" in r["messages"][0]["content"])
    assert first == {
        "model": "teacher-1",
        "temperature": 1.0,
        "top_p": 1.0,
        "max_tokens": 512,
        "messages": [{"role": "user", "content": format_prompt("Give three tips for staying healthy.")}],
    }
    assert set(srv.auth) == {f"Bearer {KEY}"}

    out = json.loads((tmp_path / "out" / "seed.answers.json").read_text())
    assert all(set(r) == {"instruction", "input", "output"} for r in out)  # alpaca_gpt4_data.json's layout
    assert [r["instruction"][:10] for r in out] == [
        "Give three",
        "Sort the n",
        "CUE:429 Na",
        "CUE:slow N",
        "CUE:length",
        "Give three",
    ]
    assert out[1] == {"instruction": "Sort the numbers.", "input": "3, 1, 2", "output": "Answer: Sort the numbers."}
    assert sum("healthy" in r["messages"][0]["content"] for r in srv.requests) == 2  # record 6 is sample 1: asked too

    saved = json.loads((tmp_path / "out" / "seed.answers.report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert report["cut_by_length"] == {"count": 1, "indices": [4], "kept": True}
    failed = report["failed (left out; a rerun asks again)"]
    assert failed["count"] == 1 and failed["indices"] == [5] and "gave up after 3 attempts" in failed["errors"]["5"]
    assert report["skipped_records"] == {"empty instruction": {"count": 1, "indices": [7]}}
    # 7 questions; the 429 and the slow one once more each; the failing one 3 times in all
    assert report["requests"]["sent"] == 7 + 1 + 1 + 2 and report["requests"]["retried"] == 4
    assert report["requests"]["prompt_tokens"] == 600 and report["estimated_cost_usd"] == pytest.approx(
        (600 * 0.03 + 60 * 0.06) / 1000
    )

    sent = len(srv.requests)
    again = S.synthesize(cfg)  # the same command again: only the failed one is asked again
    assert len(srv.requests) == sent + 3 and again["requests"]["cached"] == 6 and again["estimated_cost_usd"] == 0
    assert json.loads((tmp_path / "out" / "seed.answers.json").read_text()) == out

    captured = capsys.readouterr()
    assert "1 x cut_by_length: indices [4]" in captured.out
    assert_key_nowhere(tmp_path, captured.out, captured.err, caplog.text)


def test_drop_truncated_leaves_cut_answers_out_but_lists_them(teacher, key, tmp_path):
    srv = teacher()
    records = [{"instruction": i, "input": ""} for i in ("CUE:length Tell me.", "CUE:empty Hm.", "Ok.")]
    cfg = synth_cfg(
        tmp_path,
        srv.base_url,
        f"instructions={write(tmp_path / 'i.json', records)}",
        "job.drop_truncated=true",
        "job.max_tokens=64",
        "output=" + str(tmp_path / "a.json"),
        "min_success=0",
    )  # most are left out here
    report = S.synthesize(cfg)
    assert json.loads((tmp_path / "a.json").read_text()) == [
        {"instruction": "Ok.", "input": "", "output": "Answer: Ok."}
    ]
    assert report["cut_by_length"] == {"count": 1, "indices": [0], "kept": False}
    assert report["empty_answer (left out)"] == {"count": 1, "indices": [1]}
    assert srv.requests[0]["max_tokens"] == 64


def test_translate_then_answer_gives_a_zh_data_file(teacher, key, tmp_path):
    srv = teacher()
    records = [
        {"instruction": "Name a color.", "input": "", "output": "Red."},
        {"instruction": "Sort the numbers.", "input": "3, 1, 2", "output": "1, 2, 3"},
        {"instruction": "Name a color.", "input": "warm", "output": "Orange."},
    ]
    cfg = synth_cfg(tmp_path, srv.base_url, "job=translate", f"instructions={write(tmp_path / 'seed.json', records)}")
    report = S.synthesize(cfg)
    translated = tmp_path / "out" / "seed.Chinese.json"
    assert json.loads(translated.read_text()) == [
        {"instruction": "ZH[Name a color.]", "input": "", "output": ""},
        {"instruction": "ZH[Sort the numbers.]", "input": "ZH[3, 1, 2]", "output": ""},
        {"instruction": "ZH[Name a color.]", "input": "ZH[warm]", "output": ""},
    ]
    assert report["distinct_texts"] == 4 and len(srv.requests) == 4  # "Name a color." translated once
    assert "into Chinese" in srv.requests[0]["messages"][0]["content"] and srv.requests[0]["temperature"] == 0.0

    cfg = synth_cfg(
        tmp_path, srv.base_url, "job=answer", f"instructions={translated}", f"output={tmp_path / 'zh.json'}"
    )
    S.synthesize(cfg)
    zh = json.loads((tmp_path / "zh.json").read_text())
    assert zh[1] == {
        "instruction": "ZH[Sort the numbers.]",
        "input": "ZH[3, 1, 2]",
        "output": "Answer: ZH[Sort the numbers.]",
    }


def test_score_writes_comparison_v2_that_trains_as_reward_pairs(teacher, key, tmp_path, tokenizer, tiny_model_dir):
    import torch

    from gpt4llm.data.comparisons import read_comparison_pairs
    from gpt4llm.data.pair_datamodule import PairDataModule
    from gpt4llm.evaluation.paper_figures import read_score_lists
    from gpt4llm.models.reward_module import load_reward_model, pairwise_loss, sequence_rewards

    srv = teacher()
    questions = [("Name a color.", ""), ("Sort the numbers.", "3, 1, 2"), ("Say hi.", ""), ("Count to two.", "")]
    gpt4 = [
        {"instruction": q, "input": i, "output": f"great answer, score {9 - k % 2}"}
        for k, (q, i) in enumerate(questions)
    ]
    davinci = [
        {
            "id": k,
            "model": "text-davinci-003",
            "instruction": q,
            "input": i,
            "response": f"fine, score {7 + (k == 2) * 2}",
        }
        for k, (q, i) in enumerate(questions[:3])
    ]
    icm = [
        {"instruction": q, "input": i, "output": "CUE:badscore" if k == 1 else f"poor, score {2 + k}"}
        for k, (q, i) in enumerate(questions)
    ]
    files = [write(tmp_path / "gpt4.json", gpt4), tmp_path / "davinci.jsonl", write(tmp_path / "icm.json", icm)]
    files[1].write_text("".join(json.dumps(r) + "\n" for r in davinci))
    cfg = synth_cfg(
        tmp_path,
        srv.base_url,
        "job=score",
        f"responses={{gpt4:{files[0]},text-davinci-003:{files[1]},icm-1.3b:{files[2]}}}",
        "job.max_parse_retries=1",
    )
    report = S.synthesize(cfg)

    out = tmp_path / "out" / "comparison_data_v2.json"
    data = json.loads(out.read_text())
    assert data[0] == {
        "user_input": "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request."
        "\n\n### Instruction:\nName a color.",
        "responses_and_scores": [
            {"response": "great answer, score 9", "score": 9.0, "source": "gpt4"},
            {"response": "fine, score 7", "score": 7.0, "source": "text-davinci-003"},
            {"response": "poor, score 2", "score": 2.0, "source": "icm-1.3b"},
        ],
    }
    assert data[1]["user_input"] + "\n\n### Response:" == format_prompt("Sort the numbers.", "3, 1, 2")
    assert [len(d["responses_and_scores"]) for d in data] == [3, 2, 3, 2]  # an unparsable score; a prompt gpt-3.5 lacks
    assert report["unparsable (left out; indices into each source's file)"] == {
        "icm-1.3b": {"count": 1, "indices": [1]}
    }
    [scoring] = [
        r["messages"] for r in srv.requests if "Name a color.\n### Response\ngreat" in r["messages"][0]["content"]
    ]
    assert len(scoring) == 1 and scoring[0]["content"].startswith("### Instruction\nName a color.\n### Response\ngreat")
    assert "### End of Response\nWe would like" in scoring[0]["content"]
    assert sum("CUE:badscore" in r["messages"][0]["content"] for r in srv.requests) == 2  # asked once more, then listed
    assert read_score_lists(tmp_path / "out" / "cmp_data_scores.json") == {
        "gpt4": [9.0, 8.0, 9.0, 8.0],
        "text-davinci-003": [7.0, 7.0, 9.0],
        "icm-1.3b": [2.0, 4.0, 5.0],
    }
    from gpt4llm.evaluation.paper_figures import find_inputs

    assert find_inputs([tmp_path / "out"])["scores"] == [tmp_path / "out" / "cmp_data_scores.json"]  # Figure 2's input

    # The reward model's reader takes the file as it is: the prompt comes back with '### Response:', ties are dropped.
    pairs, read = read_comparison_pairs(out)
    assert read["layouts"] == {"comparison_data_v2": 4} and read["dropped_pairs"]["tied scores"]["count"] == 1
    assert pairs[0] == {
        "index": 0,
        "prompt": format_prompt("Name a color."),
        "chosen": "great answer, score 9",
        "rejected": "fine, score 7",
    }
    assert len(pairs) == 3 + 1 + 2 + 1  # C(3,2) + C(2,2) + (C(3,2) - a tie) + C(2,2)
    module = PairDataModule(
        tokenizer, path=str(out), val_size=1, batch_size=4, num_workers=0, cache_dir=str(tmp_path / "cache")
    )
    module.setup()
    batch = next(iter(module.train_dataloader()))
    model = load_reward_model(str(tiny_model_dir), tokenizer)
    rewards = sequence_rewards(model, batch["input_ids"], batch["attention_mask"])  # labels: for DPO
    loss = pairwise_loss(*rewards.chunk(2))
    loss.backward()
    assert torch.isfinite(loss) and model.score.weight.grad is not None
    assert_key_nowhere(tmp_path)


def test_task_and_inputs_are_checked_at_start(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        with pytest.raises(Exception, match="job.max_tokns"):
            compose(config_name="synthesize", overrides=["job.max_tokns=3"])
        # train's task group is not synthesize's: refused while composing, before anything runs
        with pytest.raises(Exception, match="Could not override 'task'"):
            compose(config_name="synthesize", overrides=["task=sft"])
        with pytest.raises(Exception, match="job/sft"):
            compose(config_name="synthesize", overrides=["job=sft"])
    cfg = synth_cfg(
        tmp_path, "http://127.0.0.1:9/v1", f"instructions={write(tmp_path / 'bad.json', [{'instruction': 3}])}"
    )
    with pytest.raises(Exception, match=r"record 0: field 'instruction' is int"):
        S.synthesize(cfg)


# --- the whole loop against our own server ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tiny_model_dir):
    from gpt4llm.inference.server import ServerSettings, load_server

    server = load_server(str(tiny_model_dir), name="tiny", settings=ServerSettings(api_key=KEY, max_batch=8)).start()
    yield server
    server.close()


def test_answer_translate_score_and_judge_against_our_server(served, key, tmp_path):
    from gpt4llm.data.demo import make_demo_records
    from gpt4llm.evaluation.judge import judge
    from gpt4llm.evaluation.responses import read_responses
    from gpt4llm.inference.openai_client import ChatClient

    seed = write(
        tmp_path / "demo.json",
        [{"instruction": r["instruction"], "input": r["input"]} for r in make_demo_records(6, seed=3)],
    )
    common = [
        "teacher.model=tiny",
        "teacher.prices=null",
        "teacher.timeout=60",
        "min_success=0",
    ]  # a tiny model's answers
    answered = S.synthesize(synth_cfg(tmp_path, served.base_url, *common, f"instructions={seed}", "job.max_tokens=6"))
    out = json.loads((tmp_path / "out" / "demo.answers.json").read_text())
    # A random tiny model: answers are noise, but every one came back, and the cut ones are listed, not lost.
    assert answered["requests"]["sent"] == 6 and answered["estimated_cost_usd"] is None
    assert len(out) + answered["empty_answer (left out)"]["count"] == 6
    assert answered["cut_by_length"]["count"] >= 1 and answered["requests"]["completion_tokens"] <= 36

    translated = S.synthesize(
        synth_cfg(tmp_path, served.base_url, *common, "job=translate", f"instructions={seed}", "job.max_tokens=6")
    )
    assert translated["requests"]["sent"] == translated["distinct_texts"] > 0

    gpt4 = write(
        tmp_path / "gpt4.json",
        [{"instruction": r["instruction"], "input": r["input"], "output": "An answer."} for r in out],
    )
    scored = S.synthesize(
        synth_cfg(
            tmp_path,
            served.base_url,
            *common,
            "job=score",
            f"responses=[{gpt4},{tmp_path / 'out' / 'demo.answers.json'}]",
            "job.max_tokens=4",
            "job.max_parse_retries=0",
        )
    )
    assert scored["sources"] == {"gpt4": len(out), "demo.answers": len(out)}
    # The tiny model does not answer with a score: each response is listed as unparsable (or, by chance, scored), or
    # as failed when the server refused it: a random answer's bytes can take many tokens and push the scoring prompt
    # past the tiny model's 512-token context (a 400 the server names). Nothing else may fail.
    listed = sum(v["count"] for v in scored["unparsable (left out; indices into each source's file)"].values())
    failures = scored["failed (left out; a rerun asks again)"]
    failed = sum(v["count"] for v in failures.values())
    assert listed + failed + sum(scored["responses_scored"].values()) == 2 * len(out)
    errors = [e for v in failures.values() for e in v.get("errors", {}).values()]
    assert all("context_length_exceeded" in e for e in errors) and len(errors) == failed, failures

    client = ChatClient(
        served.base_url, "tiny", api_key_env="SYNTH_TEST_KEY", cache_path=tmp_path / "judge.jsonl", timeout=60
    )
    # The first 8 characters of each noise answer: a random model's bytes can take many tokens, and a long one would
    # push the judge's prompt past the tiny model's 512-token context (a 400, counted as failed).
    lines = [
        {
            "id": k,
            "model": m,
            "instruction": r["instruction"],
            "input": r["input"],
            "response": r["output"][:8] if m == "a" else "No.",
        }
        for m in ("a", "b")
        for k, r in enumerate(out)
    ]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines[: len(out)]))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines[len(out) :]))
    # The paper's single-answer prompt: FastChat's pairwise review is longer than the tiny model's 512-token context.
    reviews, summary = judge(
        client,
        read_responses(tmp_path / "a.jsonl"),
        read_responses(tmp_path / "b.jsonl"),
        "single",
        {"temperature": 0.2, "max_tokens": 4},
        max_parse_retries=0,
    )
    # (an empty reply is asked again, so more than one request per answer may go out)
    assert (
        len(reviews) == len(out) and summary["requests"]["sent"] >= 2 * len(out) and summary["requests"]["failed"] == 0
    )
    assert all(r["status"] in ("ok", "unparsable") for r in reviews)
    assert_key_nowhere(tmp_path)


# --- a killed run ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_killed_run_resumes_and_pays_for_nothing_twice(teacher, key, tmp_path):
    srv = teacher(answer_limit=4)  # four answers, then every request hangs: the run is killed while waiting
    records = [{"instruction": f"Question {k}?", "input": ""} for k in range(10)]
    seed = write(tmp_path / "seed.json", records)
    args = [
        sys.executable,
        "-m",
        "gpt4llm.synthesize",
        f"instructions={seed}",
        f"teacher.base_url={srv.base_url}",
        "teacher.model=teacher-1",
        "teacher.api_key_env=SYNTH_TEST_KEY",
        "teacher.concurrency=2",
        "teacher.timeout=30",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.log_dir={tmp_path / 'logs'}",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cache = tmp_path / "data" / "cache" / "chat" / "answers.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (cache.exists() and len(cache.read_text().splitlines()) >= 4):
        time.sleep(0.1)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    first_out, first_err = proc.communicate(timeout=30)
    answered = set(srv.delivered)
    assert len(answered) == 4 and len(cache.read_text().splitlines()) == 4
    srv.answer_limit = None
    srv.release.set()
    sent_before = len(srv.requests)

    second = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr[-3000:]
    again = [r["messages"][0]["content"] for r in srv.requests[sent_before:]]
    assert not answered & set(again), "an answer received before the kill was paid for again"
    assert len(again) == 6  # the six never answered (two of them were in flight at the kill)
    [out] = (tmp_path / "logs" / "synthesize" / "answer" / "seed" / "teacher-1").glob("seed.answers.json")
    assert [r["output"] for r in json.loads(out.read_text())] == [f"Answer: Question {k}?" for k in range(10)]
    assert "requests sent 6 (retries 0), from the cache 4" in second.stdout
    assert_key_nowhere(tmp_path, first_out, first_err, second.stdout, second.stderr)
