"""MT-Bench: the judge requests and ratings against FastChat's own llm_judge code (the fschat package), the scores
against its show_result.py, bad answer files, and the command end to end with a tiny model answering and a judge on
127.0.0.1 (resumed after a kill mid-judging with no judgment lost or asked twice)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import redirect_stdout
from types import ModuleType, SimpleNamespace

import pytest

from gpt4llm.errors import RecordError
from gpt4llm.evaluation import mt_bench as MT
from helpers.fake_servers import ChatServer

# Judge prompts in the layout of FastChat's judge_prompts.jsonl (the same placeholders), with our own texts; braces
# doubled where str.format must print one, as FastChat's do.
PROMPTS = [
    {"name": "single-v1", "type": "single", "system_prompt": "You are a helpful assistant.",
     "prompt_template": "[Instruction]\nRate it, as \"[[rating]]\" ({{json}}).\n\n[Question]\n{question}\n\n"
                        "[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]",
     "description": "x", "category": "general", "output_format": "[[rating]]"},
    {"name": "single-math-v1", "type": "single", "system_prompt": "You are a helpful assistant.",
     "prompt_template": "[Question]\n{question}\n\n[Reference]\n{ref_answer_1}\n\n[Answer]\n{answer}",
     "description": "x", "category": "math", "output_format": "[[rating]]"},
    {"name": "single-v1-multi-turn", "type": "single", "system_prompt": "Judge the second answer.",
     "prompt_template": "<|U1|>\n{question_1}\n<|A1|>\n{answer_1}\n<|U2|>\n{question_2}\n<|A2|>\n{answer_2}",
     "description": "x", "category": "general", "output_format": "[[rating]]"},
    {"name": "single-math-v1-multi-turn", "type": "single", "system_prompt": "Judge the second answer, math.",
     "prompt_template": "<|R1|>\n{ref_answer_1}\n<|R2|>\n{ref_answer_2}\n<|U1|>\n{question_1}\n<|A1|>\n{answer_1}\n"
                        "<|U2|>\n{question_2}\n<|A2|>\n{answer_2}",
     "description": "x", "category": "math", "output_format": "[[rating]]"},
]  # fmt: skip
QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a poem about {braces}.", "Now in French: «ça»."]},
    {"question_id": 111, "category": "math", "turns": ["What is 2+2?", "And 3+3?"]},
    {"question_id": 121, "category": "coding", "turns": ["Write `f()`.", "Add a test\nfor it."]},
]
REFERENCES = [
    {"question_id": 111, "model_id": "gpt-4", "choices": [{"index": 0, "turns": ["4", "6"]}]},
    {"question_id": 121, "model_id": "gpt-4", "choices": [{"index": 0, "turns": ["def f(): ...", "assert f()"]}]},
]
ANSWERS = {"81": ["Roses {are} red", "Les roses"], "111": ["4", "six"], "121": ["def f(): pass", "ok\n{x}"]}


def write_files(directory):
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in (("question.jsonl", QUESTIONS), ("judge_prompts.jsonl", PROMPTS), ("gpt-4.jsonl", REFERENCES)):
        (directory / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return directory


@pytest.fixture
def fastchat(monkeypatch):
    """FastChat's llm_judge.common, its OpenAI call replaced by one that records the messages it would send."""
    pytest.importorskip("fastchat")
    if "anthropic" not in sys.modules:  # common.py imports it at the top; only its Claude judges use it
        monkeypatch.setitem(sys.modules, "anthropic", ModuleType("anthropic"))
    from fastchat.llm_judge import common

    sent = []

    def fake_openai(model, conv, temperature, max_tokens, api_dict=None):
        sent.append({"messages": conv.to_openai_api_messages(), "temperature": temperature, "max_tokens": max_tokens})
        return fake_openai.reply

    fake_openai.reply = "[[5]]"
    monkeypatch.setattr(common, "chat_completion_openai", fake_openai)
    return SimpleNamespace(common=common, sent=sent, fake=fake_openai)


def test_requests_are_fastchats_bytes(fastchat, tmp_path):
    files = write_files(tmp_path)
    prompts, references = (
        MT.load_judge_prompts(files / "judge_prompts.jsonl"),
        MT.load_reference_answers(files / "gpt-4.jsonl"),
    )
    ours = MT.judge_requests(QUESTIONS, ANSWERS, prompts, references)
    assert [(r["question_id"], r["turn"], r["prompt"]) for r in ours] == [
        (81, 1, "single-v1"), (81, 2, "single-v1-multi-turn"), (111, 1, "single-math-v1"),
        (111, 2, "single-math-v1-multi-turn"), (121, 1, "single-math-v1"), (121, 2, "single-math-v1-multi-turn"),
    ]  # fmt: skip
    fc = fastchat.common
    judges = {  # gen_judgment.make_judge_single, and its choice of judge by category and turn
        (False, False): fc.Judge("gpt-4", prompts["single-v1"]),
        (True, False): fc.Judge("gpt-4", prompts["single-math-v1"], ref_based=True),
        (False, True): fc.Judge("gpt-4", prompts["single-v1-multi-turn"], multi_turn=True),
        (True, True): fc.Judge("gpt-4", prompts["single-math-v1-multi-turn"], ref_based=True, multi_turn=True),
    }
    refs = {r["question_id"]: r for r in REFERENCES}
    for q in QUESTIONS:
        ref_based = q["category"] in fc.NEED_REF_CATS
        for multi_turn in (False, True):
            answer = {"choices": [{"index": 0, "turns": ANSWERS[str(q["question_id"])]}]}
            fc.run_judge_single(q, answer, judges[(ref_based, multi_turn)], refs.get(q["question_id"]), multi_turn)
    assert [r["messages"] for r in ours] == [s["messages"] for s in fastchat.sent]
    assert {(s["temperature"], s["max_tokens"]) for s in fastchat.sent} == {(0, 2048)}  # conf/metric/mt_bench.yaml's


@pytest.mark.parametrize(
    "reply",
    ["Rating: [[7]]", "[[8.5]] then [[2]]", "I give [6].", "[[ 7 ]]", "no rating", "[[10]]", "[7.] and [[3]]", "[[0]]"],
)
def test_rating_is_fastchats(fastchat, reply):
    fastchat.fake.reply = reply
    judge = fastchat.common.Judge("gpt-4", PROMPTS[0])
    rating, _, _ = fastchat.common.run_judge_single(QUESTIONS[0], {"choices": [{"turns": ["a", "b"]}]}, judge, None)
    ours = MT.parse_rating(reply)
    assert (ours if ours is not None else -1) == rating and type(ours if ours is not None else -1) is type(rating)


def test_scores_are_show_results(tmp_path):
    pytest.importorskip("fastchat")
    from fastchat.llm_judge import show_result

    judgments = [
        {"question_id": q, "model": "ours", "turn": t, "category": c, "score": s}
        for q, t, c, s in [
            (81, 1, "writing", 7), (81, 2, "writing", 5), (111, 1, "math", 2), (111, 2, "math", -1),
            (121, 1, "coding", 9.5), (121, 2, "coding", 4), (82, 1, "writing", 3), (82, 2, "writing", 8),
        ]
    ]  # fmt: skip
    path = tmp_path / "judgments.jsonl"
    path.write_text("".join(json.dumps(j) + "\n" for j in judgments))
    printed = io.StringIO()
    args = SimpleNamespace(input_file=str(path), bench_name="mt_bench", model_list=None, judge_model="gpt-4")
    import pandas as pd

    # FastChat's elo_analysis (test_arena_hard imports it) sets pandas' float format to 2 places for the process
    with redirect_stdout(printed), pd.option_context("display.float_format", None, "display.precision", 6):
        show_result.display_result_single(args)
    theirs = [float(line.split()[-1]) for line in printed.getvalue().splitlines() if line.startswith("ours")]
    summary = MT.summarize([j | {"score": None if j["score"] == -1 else j["score"]} for j in judgments], "ours")
    assert [round(x, 6) for x in (summary["turn_1"], summary["turn_2"], summary["score"])] == theirs
    assert summary["per_category"]["writing"] == {"score": 5.75, "turn_1": 5.0, "turn_2": 6.5}
    assert summary["per_category"]["math"]["turn_2"] is None and summary["unparsable"] == ["111/turn 2"]


def test_bad_answer_files_name_the_first_bad_id(tmp_path):
    def answers(rows):
        path = tmp_path / "answers.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    good = [{"id": q["question_id"], "model": "m", "turns": ANSWERS[str(q["question_id"])]} for q in QUESTIONS]
    assert MT.read_answers(answers(good), QUESTIONS) == ("m", ANSWERS)
    fastchat_layout = [{"question_id": int(k), "model_id": "fc", "choices": [{"turns": v}]} for k, v in ANSWERS.items()]
    assert MT.read_answers(answers(fastchat_layout), QUESTIONS) == ("fc", ANSWERS)
    with pytest.raises(RecordError, match="question 111: 1 answers for 2 turns"):
        MT.read_answers(answers([good[0], good[1] | {"turns": ["4"]}, good[2]]), QUESTIONS)
    with pytest.raises(RecordError, match="question id 999 is not an MT-Bench question"):
        MT.read_answers(answers([*good, {"id": 999, "turns": ["a", "b"]}]), QUESTIONS)
    with pytest.raises(RecordError, match="question 121 has no answer"):
        MT.read_answers(answers(good[:2]), QUESTIONS)
    with pytest.raises(RecordError, match="line 2: expected 'id' and 'turns'"):
        MT.read_answers(answers([good[0], {"id": 111, "response": "x"}]), QUESTIONS)


def evaluate_args(tmp_path, srv, *extra):
    files = tmp_path / "files"
    return [
        "metric=mt_bench",
        f"metric.base_url={srv.base_url}",
        "metric.api_key_env=null",
        f"metric.files.questions.path={files / 'question.jsonl'}",
        f"metric.files.judge_prompts.path={files / 'judge_prompts.jsonl'}",
        f"metric.files.reference_answers.path={files / 'gpt-4.jsonl'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"paths.data_dir={tmp_path / 'data'}",
        *extra,
    ]


@pytest.mark.slow
def test_cli_answers_judges_and_resumes_after_a_kill(loopback, tiny_model_dir, tmp_path):
    write_files(tmp_path / "files")
    answered, proc = [], {}

    def reply(request):
        user = request["messages"][-1]["content"]
        answered.append(user)
        if len(answered) == 3 and "run" in proc:  # the first run is killed while the judge answers its 3rd request
            os.kill(proc["run"].pid, signal.SIGKILL)
            time.sleep(0.5)
        return "Fine. [[4]]" if "<|U2|>" in user else "Rating: [[8]]"

    srv = loopback(ChatServer, reply=reply)
    args = evaluate_args(
        tmp_path, srv, f"model.path={tiny_model_dir}", "model.name=tiny", "metric.answers.max_new_tokens=8",
        "metric.concurrency=1", f"hydra.run.dir={tmp_path / 'run1'}",
    )  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc["run"] = subprocess.Popen([sys.executable, "-m", "gpt4llm.evaluate", *args], cwd=tmp_path, env=env)
    assert proc["run"].wait(timeout=300) == -signal.SIGKILL
    assert not (tmp_path / "run1" / "mt_bench_summary_tiny.json").exists()
    answers = [json.loads(line) for line in (tmp_path / "logs/generate/mt_bench/tiny/answers.jsonl").open()]
    assert [len(a["turns"]) for a in answers] == [2, 2, 2] and answers[0]["questions"] == QUESTIONS[0]["turns"]
    first = len(answered)
    proc.clear()
    args[-1] = f"hydra.run.dir={tmp_path / 'run2'}"
    done = subprocess.run([sys.executable, "-m", "gpt4llm.evaluate", *args], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(answered) == 6 + (first - 2)  # those answered before the kill (2) were not asked again
    assert len(set(answered)) == 6
    judgments = [json.loads(line) for line in (tmp_path / "run2" / "mt_bench_judgments_tiny.jsonl").open()]
    assert sorted((j["question_id"], j["turn"]) for j in judgments) == [(q, t) for q in (81, 111, 121) for t in (1, 2)]
    summary = json.loads((tmp_path / "run2" / "mt_bench_summary_tiny.json").read_text())
    assert (summary["turn_1"], summary["turn_2"], summary["score"], summary["rated"]) == (8.0, 4.0, 6.0, 6)
    assert (tmp_path / "run2" / "mt_bench_radar.png").stat().st_size > 0
    assert "| tiny | 6.00 | 8.00 | 4.00 |" in done.stdout
    assert list((tmp_path / "run2" / "tensorboard").glob("events.out.tfevents.*"))


def test_cli_unparsable_judgments_are_counted_not_scored(loopback, tmp_path):
    from helpers.runs import run_cli

    write_files(tmp_path / "files")
    srv = loopback(
        ChatServer,
        reply=lambda r: "No rating." if r["messages"][-1]["content"].startswith("[Question]\nWhat is 2+2") else "[[6]]",
    )
    path = tmp_path / "answers.jsonl"
    path.write_text(
        "".join(json.dumps({"id": int(k), "model": "given", "turns": v}) + "\n" for k, v in ANSWERS.items())
    )
    args = evaluate_args(tmp_path, srv, f"responses={path}", "metric.min_success=0", f"hydra.run.dir={tmp_path / 'r'}")
    out = run_cli("gpt4llm.evaluate", args, tmp_path).stdout
    summary = json.loads((tmp_path / "r" / "mt_bench_summary_given.json").read_text())
    assert summary["unparsable"] == ["111/turn 1"] and summary["rated"] == 5 and summary["score"] == 6.0
    assert "1 unparsable judgments ['111/turn 1']" in out
    assert "6 judge requests, 0 already answered in the cache" in out


def test_turns_resume_after_a_torn_second_turn_and_refuse_changed_questions(tiny_model_dir, tmp_path):
    """answer_turns: a killed run's torn turn-2 file resumes to what an unbroken run writes; answers to a question
    whose text changed since are refused, not reused; questions no longer in the set are left out."""
    from gpt4llm.inference.resumable_generation import answer_turns, load_generator

    model, tokenizer, fmt = load_generator(str(tiny_model_dir))
    decoding = {"max_new_tokens": 6, "do_sample": False, "num_samples": 1}

    def answer(directory, questions=QUESTIONS):
        path = answer_turns(model, tokenizer, fmt, questions, directory, decoding, 4, 0, "tiny", "MT-Bench")
        return [json.loads(line) for line in path.read_text().splitlines()]

    whole = answer(tmp_path / "a")
    assert [len(a["turns"]) for a in whole] == [2, 2, 2] and [a["id"] for a in whole] == [81, 111, 121]
    turn2 = tmp_path / "a" / "turn2.jsonl"
    lines = turn2.read_text().splitlines(keepends=True)
    turn2.write_text(lines[0] + lines[1][: len(lines[1]) // 2])  # killed while writing the second answer
    assert answer(tmp_path / "a") == whole
    assert answer(tmp_path / "a", QUESTIONS[:2]) == whole[:2]
    changed = [QUESTIONS[0] | {"turns": ["Another question.", QUESTIONS[0]["turns"][1]]}, *QUESTIONS[1:]]
    with pytest.raises(RecordError, match="turn1.jsonl: the answer to 81 was asked another question"):
        answer(tmp_path / "a", changed)


def test_offline_a_missing_benchmark_file_is_one_error_naming_it(tmp_path):
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"id": int(k), "turns": v}) + "\n" for k, v in ANSWERS.items()))
    env = dict(os.environ, GPT4LLM_OFFLINE="1")
    args = [
        "metric=mt_bench",
        f"responses={answers}",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.run.dir={tmp_path}",
    ]
    proc = subprocess.run([sys.executable, "-m", "gpt4llm.evaluate", *args], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=300)  # fmt: skip
    target = tmp_path / "data" / "mt_bench" / "question.jsonl"
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        f"Error: {target} is missing, and GPT4LLM_OFFLINE is set, so it is not downloaded from "
        "https://raw.githubusercontent.com/lm-sys/FastChat/0e6d3e4beaab66f4d3f93db72541a4abab8af28d/fastchat/llm_judge/"
        f"data/mt_bench/question.jsonl. Copy the file to {target}, or set metric.files.questions.path=/path/to/"
        "question.jsonl."
    )
