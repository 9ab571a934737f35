"""Arena-Hard and AlpacaEval 2 through `python -m gpt4llm.evaluate` with a judge on 127.0.0.1: the games and their
order, v0.1's continuation of a judgment without a verdict, unparsable verdicts counted and never scored, the order
swap undone, log-probabilities or the text read, identical outputs never asked, the cache on a rerun, the cost
refused above max_cost, and bad answer files. The numbers themselves are checked against the reference tools in
tests/test_arena_hard.py and tests/test_alpaca_eval.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml

from gpt4llm.evaluation import alpaca_eval as AE
from gpt4llm.evaluation import arena_hard as AH
from helpers.fake_servers import ChatServer
from helpers.runs import run_cli

SYSTEM = "Judge A and B; end with [[A>B]] or the like."
TEMPLATE = "<|Q|>\n{question_1}\n<|A|>\n{answer_1}\n<|B|>\n{answer_2}"
QUESTIONS = {"q1": "Sort {a, b}.", "q2": "Name a prime.", "q3": "Say «hi».", "q4": "Add 1+1.", "q5": "Spell cat."}
BASELINE = {"q1": "sorted: a, b", "q2": "2", "q3": "hi", "q4": "2", "q5": "c-a-t"}
MINE = {"q1": "a then b", "q2": "seven", "q3": "hello", "q4": "11", "q5": "C, A, T"}


def arena_files(directory):
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"question_id": q, "category": "arena-hard-v0.1", "cluster": "c", "turns": [{"content": t}]} for q, t in
            QUESTIONS.items()]  # fmt: skip
    (directory / "question.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    answers = [{"question_id": q, "model_id": "gpt-4-0314", "choices": [{"index": 0, "turns": [{"content": a}]}]}
               for q, a in BASELINE.items()]  # fmt: skip
    (directory / "gpt-4-0314.jsonl").write_text("".join(json.dumps(r) + "\n" for r in answers))
    config = {
        "judge_model": "gpt-4-1106-preview",
        "temperature": 0,
        "max_tokens": 4096,
        "system_prompt": SYSTEM,
        "prompt_template": [TEMPLATE],
        "regex_pattern": r"\[\[([AB<>=]+)\]\]",
        "number_of_judgment_attempts": 2,
    }
    (directory / "judge_config.yaml").write_text(yaml.safe_dump(config))  # fmt: skip
    return directory


def arena_args(tmp_path, srv, *extra):
    files = tmp_path / "files"
    return [
        "metric=arena_hard",
        f"metric.base_url={srv.base_url}",
        "metric.api_key_env=null",
        f"metric.files.questions.path={files / 'question.jsonl'}",
        f"metric.files.baseline_answers.path={files / 'gpt-4-0314.jsonl'}",
        f"metric.files.judge_config.path={files / 'judge_config.yaml'}",
        "metric.rounds=10",
        "metric.weight=1",  # (few battles: a resample of only wins could not be rated, as in show_result)
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        *extra,
    ]


def arena_judge(request):
    """q1: the model wins both games (B>A with the baseline as A, then A>B); q2: no verdict at first, a tie when
    continued; q3: two different verdicts in one reply (unparsable, and not continued); q4: the baseline wins both;
    q5: the model wins both by far."""
    messages = request["messages"]
    user = messages[1]["content"]
    model_first = any(user.split("<|A|>\n")[1].startswith(a) for a in MINE.values())
    if "Sort" in user:
        return "A is worse. [[A>B]]" if model_first else "[[B>A]]"
    if "prime" in user:
        return "My verdict: [[A=B]]" if len(messages) > 2 else "Both are fine, I think"
    if "Add" in user:
        return "[[B>A]]" if model_first else "[[A>B]]"
    if "Spell" in user:
        return "[[A>>B]]" if model_first else "[[B>>A]]"
    return "[[A>>B]] no, [[B>A]]"


def test_arena_hard_games_continuation_and_unparsable(loopback, tmp_path):
    arena_files(tmp_path / "files")
    srv = loopback(ChatServer, reply=arena_judge)
    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(json.dumps({"id": q, "model": "ours", "response": a}) + "\n" for q, a in MINE.items()))
    args = arena_args(tmp_path, srv, f"responses={mine}", "metric.min_success=0", f"hydra.run.dir={tmp_path / 'r'}")
    out = run_cli("gpt4llm.evaluate", args, tmp_path).stdout
    # 10 games + 2 continued (q2's games, without a verdict); q3's two-verdict games are not continued
    assert len(srv.requests) == 12
    continued = [r for r in srv.requests if len(r["messages"]) == 4]
    assert len(continued) == 2 and all(r["messages"][3]["content"] == AH.RETRY_PROMPT for r in continued)
    assert continued[0]["messages"][2] == {"role": "assistant", "content": "Both are fine, I think"}
    sent = [r["messages"] for r in srv.requests]
    for game in AH.pairwise_messages(SYSTEM, TEMPLATE, QUESTIONS["q1"], BASELINE["q1"], MINE["q1"]):
        assert game in sent  # both orders
    first = srv.requests[0]
    assert (first["temperature"], first["max_tokens"], first["model"]) == (0, 4096, "gpt-4-1106-preview")
    judgments = {
        j["question_id"]: j for j in map(json.loads, (tmp_path / "r" / "arena_hard_judgments_ours.jsonl").open())
    }
    assert [g["score"] for g in judgments["q1"]["games"]] == ["B>A", "A>B"]
    assert [g["score"] for g in judgments["q2"]["games"]] == ["A=B", "A=B"]
    assert judgments["q2"]["games"][0]["judgment"] == "\nBoth are fine, I think\nMy verdict: [[A=B]]"
    assert [g["score"] for g in judgments["q3"]["games"]] == [None, None]
    summary = json.loads((tmp_path / "r" / "arena_hard_summary_ours.json").read_text())
    assert summary["no_verdict"] == ["q3/game 1", "q3/game 2"] and summary["verdicts"] == 8
    expected = AH.leaderboard(AH.battles(list(judgments.values()), "gpt-4-0314", 1), "gpt-4-0314", 10, 42)
    assert summary["leaderboard_row"] == json.loads(json.dumps(next(r for r in expected if r["model"] == "ours")))
    assert summary["leaderboard_row"]["score"] > 50  # wins 4 games (2 by far), ties 2, loses 2
    assert "| ours |" in out and "2 games without a verdict, not scored" in out
    # the same command again: every judgment from the cache
    run_cli("gpt4llm.evaluate", [*args[:-1], f"hydra.run.dir={tmp_path / 'r2'}"], tmp_path)
    assert len(srv.requests) == 12


def test_arena_hard_refuses_above_max_cost_and_bad_answers(loopback, tmp_path):
    import subprocess
    import sys

    arena_files(tmp_path / "files")
    srv = loopback(ChatServer, reply=arena_judge)

    def evaluate(answers, *extra):
        path = tmp_path / "answers.jsonl"
        path.write_text("".join(json.dumps({"id": q, "response": a}) + "\n" for q, a in answers.items()))
        args = arena_args(tmp_path, srv, f"responses={path}", *extra)
        return subprocess.run([sys.executable, "-m", "gpt4llm.evaluate", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300, stdin=subprocess.DEVNULL)  # fmt: skip

    expensive = evaluate(MINE, "metric.max_cost=0.000001")
    assert expensive.returncode != 0 and "above metric.max_cost=$1e-06" in expensive.stderr
    assert not srv.requests  # nothing was sent
    missing = evaluate({q: "x" for q in ("q1", "q2", "q4", "q5")})
    assert missing.returncode != 0 and "Arena-Hard question q3 has no answer" in missing.stderr
    other = evaluate(MINE | {"v81": "z"})
    assert other.returncode != 0 and "id v81 is not a Arena-Hard question" in other.stderr
    twice = evaluate(MINE, f"responses=[{tmp_path / 'answers.jsonl'},{tmp_path / 'answers.jsonl'}]")
    assert twice.returncode != 0 and "are both answers of model" in twice.stderr


N = 10  # AlpacaEval instructions in the test set


def alpaca_files(directory, rng):
    directory.mkdir(parents=True, exist_ok=True)
    baseline = [
        {"dataset": "t", "instruction": f"Task {i}: {{explain}} «{i}».", "output": "b" * (20 + 7 * i),
         "generator": "gpt4_1106_preview"} for i in range(N)
    ]  # fmt: skip
    (directory / "outputs.json").write_text(json.dumps(baseline, ensure_ascii=False))
    (directory / "clf.txt").write_text(
        "<|im_start|>system\nPick the better one.\n<|im_end|>\n<|im_start|>user\n{instruction}\n\n"
        'm: """{output_1}"""\nM: """{output_2}"""\n<|im_end|>'
    )
    difficulty = rng.normal(0, 1, N)
    gamed = pd.concat(
        pd.DataFrame({"model": name, "preference": rng.uniform(0.1, 0.9, N), "index": np.arange(N),
                      "instruction_difficulty": difficulty, "not_gamed_baseline": False,
                      "std_delta_len": sign * np.abs(rng.normal(1, 0.5, N))})
        for name, sign in (("gamed_concise", 1.0), ("gamed_verbose", -1.0))
    )  # fmt: skip
    gamed.to_csv(directory / "df_gamed.csv", index=False)
    return baseline, gamed


def test_alpaca_eval_preferences_swaps_and_draws(loopback, tmp_path):
    rng = np.random.default_rng(0)
    baseline, gamed = alpaca_files(tmp_path / "files", rng)
    mine = [("o" * (10 + 13 * i)) for i in range(N)]
    mine[3] = baseline[3]["output"]  # identical to the baseline's: a draw, never sent
    first_prob = {i: float(rng.uniform(0.05, 0.95)) for i in range(N)}  # the judge's P("m"), per instruction

    def logprobs(request):
        i = int(request["messages"][-1]["content"].split(":")[0].split()[-1])
        if i == 5:
            return None  # this judge gave no log-probabilities for it: read from the text
        p = first_prob[i]
        top = [{"token": "m", "logprob": math.log(p)}, {"token": "M", "logprob": math.log(1 - p)}]
        return {"content": [{"token": "m", "logprob": math.log(p), "top_logprobs": top}]}

    srv = loopback(ChatServer, reply=lambda r: "M", logprobs=logprobs)
    files = tmp_path / "files"
    path = tmp_path / "mine.json"  # alpaca_eval's own model_outputs.json layout, in another order
    path.write_text(json.dumps([{"instruction": baseline[i]["instruction"], "output": mine[i], "generator": "ours"}
                                for i in reversed(range(N))]))  # fmt: skip
    args = [
        "metric=alpaca_eval", f"metric.base_url={srv.base_url}", "metric.api_key_env=null", f"responses={path}",
        f"metric.files.prompt.path={files / 'clf.txt'}", f"metric.files.baseline_outputs.path={files / 'outputs.json'}",
        f"metric.files.gamed.path={files / 'df_gamed.csv'}", f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.run.dir={tmp_path / 'r'}",
    ]  # fmt: skip
    out = run_cli("gpt4llm.evaluate", args, tmp_path).stdout
    assert len(srv.requests) == N - 1
    assert all(r["max_tokens"] == 1 and r["logprobs"] is True and r["top_logprobs"] == 5 for r in srv.requests)
    expected = []
    for i in range(N):
        switched = AE.is_switched(baseline[i]["instruction"])
        shown = (mine[i], baseline[i]["output"]) if switched else (baseline[i]["output"], mine[i])
        if i != 3:
            sent = next(r for r in srv.requests if r["messages"][-1]["content"].startswith(f"Task {i}:"))
            assert sent["messages"] == AE.judge_messages((files / "clf.txt").read_text(), baseline[i]["instruction"],
                                                         *shown)  # fmt: skip
        shown_pref = 1.5 if i == 3 else 2.0 if i == 5 else 2 - first_prob[i]  # "M" read from the text for 5
        expected.append(AE.unswitch(shown_pref, switched) if i != 3 else 1.5)
    annotations = json.loads((tmp_path / "r" / "alpaca_eval_annotations_ours.json").read_text())
    assert [a["preference"] for a in annotations] == pytest.approx(expected, abs=1e-12)
    summary = json.loads((tmp_path / "r" / "alpaca_eval_summary_ours.json").read_text())
    assert summary["win_rate"] == pytest.approx(AE.win_rate(expected)["win_rate"], abs=1e-9)
    want = AE.length_controlled_winrate(annotations, gamed)["length_controlled_winrate"]
    assert summary["length_controlled_winrate"] == pytest.approx(want, abs=1e-9)
    assert summary["read_by_text"] == 1 and summary["n_total"] == N and "1 preferences read from the reply" in out


@pytest.mark.slow
def test_alpaca_eval_with_our_served_model_as_the_judge(tiny_model_dir, tmp_path):
    """gpt4llm.serve gives no log-probabilities and refuses a request for them: the run asks again for the letter
    alone and reads it from the text (binarized), counting what it could not read; nothing fails."""
    from gpt4llm.inference.server import ServerSettings, load_server

    rng = np.random.default_rng(1)
    baseline, _ = alpaca_files(tmp_path / "files", rng)
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"id": i, "model": "ours", "response": f"answer {i}"}) + "\n" for i in range(N)))
    server = load_server(str(tiny_model_dir), name="tiny", settings=ServerSettings(max_batch=8)).start()
    try:
        files = tmp_path / "files"
        args = [
            "metric=alpaca_eval", f"metric.base_url={server.base_url}", "metric.model=tiny", "metric.api_key_env=null",
            "metric.prices=null", "metric.min_success=0", f"responses={path}",
            f"metric.files.prompt.path={files / 'clf.txt'}",
            f"metric.files.baseline_outputs.path={files / 'outputs.json'}",
            f"metric.files.gamed.path={files / 'df_gamed.csv'}", f"paths.data_dir={tmp_path / 'data'}",
            f"hydra.run.dir={tmp_path / 'r'}",
        ]  # fmt: skip
        out = run_cli("gpt4llm.evaluate", args, tmp_path).stdout
    finally:
        server.close()
    assert "The judge refuses log-probabilities" in out and "not supported by this server: logprobs" in out
    summary = json.loads((tmp_path / "r" / "alpaca_eval_summary_ours.json").read_text())
    assert summary["failed"] == [] and summary["read_by_text"] == N
    annotations = json.loads((tmp_path / "r" / "alpaca_eval_annotations_ours.json").read_text())
    assert all(a["read_by"] == "text" for a in annotations) and len(annotations) == N


def test_arena_hard_style_control_is_a_second_leaderboard(loopback, tmp_path, monkeypatch):
    """metric.style_control=style: the answers' features (tokens by the counter Arena-Hard uses, replaced here by a
    word count: tiktoken's file is a download) and a style-controlled leaderboard beside the plain one, as
    show_result.py --style-control computes them (its numbers: tests/test_arena_hard.py)."""
    from hydra import compose, initialize_config_dir

    from gpt4llm.app import resolvers
    from gpt4llm.evaluate import evaluate
    from gpt4llm.evaluation import answer_style
    from helpers.configs import CONF

    resolvers.register()
    arena_files(tmp_path / "files")
    srv = loopback(ChatServer, reply=arena_judge)
    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(json.dumps({"id": q, "model": "ours", "response": a}) + "\n" for q, a in MINE.items()))
    monkeypatch.setattr(answer_style, "tiktoken_counter", lambda: lambda text: len(text.split()))
    args = arena_args(tmp_path, srv, f"responses={mine}", "metric.min_success=0", "metric.style_control=style")
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=[*args, f"paths.output_dir={tmp_path / 'r'}"])
    (tmp_path / "r").mkdir()
    evaluate(cfg)
    styled = json.loads((tmp_path / "r" / "arena_hard_style_leaderboard.json").read_text())
    judgments = [json.loads(line) for line in (tmp_path / "r" / "arena_hard_judgments_ours.jsonl").open()]
    count = answer_style.tiktoken_counter()
    features = {"gpt-4-0314": {q: answer_style.style_features(a, count) for q, a in BASELINE.items()}}
    features["ours"] = {q: answer_style.style_features(a, count) for q, a in MINE.items()}
    battles = AH.battles(judgments, "gpt-4-0314", 1, features=features)
    expected = AH.style_leaderboard(battles, "gpt-4-0314", control="style", rounds=10, seed=42)
    assert styled == json.loads(json.dumps(expected))
    summary = json.loads((tmp_path / "r" / "arena_hard_summary_ours.json").read_text())
    assert summary["style_control"]["coefficients"] == expected["displayed"]
    assert (
        summary["style_control"]["row"]["score"] == next(r for r in expected["rows"] if r["model"] == "ours")["score"]
    )
