"""Arena-Hard-Auto's computations (gpt4llm.evaluation.arena_hard) against independent references.

- Ratings and bootstrap: FastChat's own elo_analysis (fschat, skipped where it is not installed), with its
  LogisticRegression made unpenalized with tol=1e-8 as Arena-Hard's compute_mle_elo calls it, and anchored as
  Arena-Hard anchors (the baseline moved to 1000).
- Battles, leaderboard (style control too), messages and verdicts: literals produced by running
  lmarena/arena-hard-auto's own code from a scratch directory outside this project (the repository is not available
  in CI): the v0.1-era scripts at commit
  3071ef95d913bb5cd632641db336a3b6c7fe4bdd (show_result.py blob 21c5eb95, utils_math.py blob 8d2c7aa4,
  gen_judgment.py blob 6afa7544) and HEAD 196f6b826783b3da7310e361a805fa36f0be83f3 (show_result.py blob aa9f2a2b,
  gen_judgment.py blob 0f6854cd), under Python 3.11, numpy 2.4.6 (with np.NAN = np.nan, the alias numpy 2 removed),
  pandas 3.1.1, scikit-learn 1.9.1. Each literal says which function made it from which inputs.
"""

from __future__ import annotations

import importlib
import math
import random
import sys
import types

import pytest

from gpt4llm.errors import ConfigError, RecordError
from gpt4llm.evaluation.arena_hard import (
    average_tokens,
    battles,
    bootstrap,
    bradley_terry,
    judge_messages,
    leaderboard,
    needs_retry,
    pairwise_messages,
    parse_verdict,
    score_battles,
    score_leaderboard,
    style_bootstrap,
    style_bradley_terry,
    style_leaderboard,
    style_matrices,
)

BASELINE = "gpt-4-0314"

# The fixed judgments: per model, (game 1 verdict with the baseline as A, game 2 verdict with the model as A) for
# questions q00..q15; None = unparsable; "A<B" and "B=A" are labels v0.1 does not know (dropped there, scored at
# HEAD). Drawn once with random.Random(20240401) and written out here. "alpha-z" sorts before the baseline's name
# and the others after it, which matters to predict_win_rate's last digit.
JUDGMENTS = {
    "model-x": [
        ("A>B", "B>A"), ("B>A", "A>>B"), ("B>A", "A>B"), (None, "A>B"), ("A=B", "A>>B"), ("A=B", "A=B"),
        ("A=B", "A=B"), ("A=B", "A>>B"), ("B>>A", "B>A"), ("B>>A", "A>>B"), ("A=B", "A>B"), ("B>A", "A=B"),
        ("B>>A", "A>B"), ("B>>A", "A>>B"), ("B>A", "B>A"), ("B>A", "A>B"),
    ],
    "model-y": [
        ("A>B", "A=B"), ("A>B", "A=B"), ("A>>B", "B>A"), ("A=B", "B>>A"), ("A>>B", "A>B"), ("A>B", None),
        ("A>B", "B>A"), ("B>A", "A=B"), ("A>>B", "B>A"), (None, None), ("A>B", "B>A"), ("A>B", "A=B"),
        ("A>>B", "A>>B"), ("B>A", "A=B"), ("B>A", "B>A"), ("B>A", "B>>A"),
    ],
    "alpha-z": [
        ("B>A", "A>B"), ("A>>B", "A>B"), ("A=B", "A<B"), ("B>>A", "B>>A"), ("A>>B", "A=B"), ("A=B", "A=B"),
        ("B>A", "A=B"), ("B=A", "A>B"), ("A>>B", "A>B"), ("A=B", "A>B"), ("A>>B", "A>>B"), ("A=B", "A>B"),
        ("B>>A", "B>A"), ("A=B", "B>>A"), ("A>B", "A=B"), ("A=B", "B>>A"),
    ],
}  # fmt: skip


def v01_records():
    """The judgments in v0.1's file layout, all models in one file in this order (so glob order plays no part)."""
    return [
        {"question_id": f"q{q:02d}", "model": model, "judge": "judge", "games": [{"score": g1}, {"score": g2}]}
        for model, games in JUDGMENTS.items()
        for q, (g1, g2) in enumerate(games)
    ]


@pytest.fixture(scope="module")
def pd():
    pytest.importorskip("sklearn")
    return pytest.importorskip("pandas")


@pytest.fixture(scope="module")
def elo_analysis(pd):
    """fastchat.serve.monitor.elo_analysis, importing with stand-ins for what it imports but never uses here (pytz,
    plotly). pandas is imported first: it reads pytz's version when pytz is importable, and a stand-in has none."""
    pytest.importorskip("fastchat")
    added = []
    for name in ("pytz", "plotly", "plotly.express"):
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = types.ModuleType(name)
            added.append(name)
    if "pytz" in added:
        sys.modules["pytz"].timezone = lambda name: None
    if "plotly.express" in added:
        sys.modules["plotly"].express = sys.modules["plotly.express"]
    float_format = pd.get_option("display.float_format")
    try:
        return importlib.import_module("fastchat.serve.monitor.elo_analysis")
    finally:
        pd.set_option("display.float_format", float_format)  # it sets 2 places for the whole process on import
        for name in added:
            del sys.modules[name]


@pytest.fixture
def arena_hard_fit(elo_analysis, monkeypatch):
    """FastChat's compute_elo_mle_with_tie fitted as Arena-Hard's compute_mle_elo fits (LogisticRegression
    fit_intercept=False, no penalty, tol=1e-8; FastChat 0.2.36 keeps sklearn's default L2 penalty) and anchored as
    it anchors: + (1000 - the baseline's rating)."""
    import numpy as np
    import sklearn.linear_model

    original = sklearn.linear_model.LogisticRegression
    # scikit-learn 1.8 replaced penalty=None by C=inf (same fit); older ones only know penalty=None.
    unpenalized = {"C": np.inf} if original().get_params().get("penalty") == "deprecated" else {"penalty": None}

    def fit(df):
        # patched only around FastChat's call (it imports LogisticRegression when called), never around ours
        with monkeypatch.context() as patch:
            patch.setattr(
                sklearn.linear_model, "LogisticRegression", lambda **kwargs: original(**kwargs, **unpenalized, tol=1e-8)
            )
            ratings = elo_analysis.compute_elo_mle_with_tie(df)
        return ratings + (1000 - ratings[BASELINE])

    return fit


def synthetic_battles(pd, seed=0, n=300):
    """Battles among four models (all pairs, either side), with ties, both-bad ties and strong verdicts written
    three times, drawn from fixed strengths."""
    import numpy as np

    rng = np.random.RandomState(seed)
    names = [BASELINE, "model-x", "model-y", "alpha-z"]
    strength = {BASELINE: 0.0, "model-x": 0.8, "model-y": -0.6, "alpha-z": 0.2}
    rows = []
    for _ in range(n):
        a, b = rng.choice(4, size=2, replace=False)
        p_a = 1 / (1 + math.exp(strength[names[b]] - strength[names[a]]))
        u = rng.rand()
        winner = "tie" if u < 0.15 else "tie (bothbad)" if u < 0.2 else "model_a" if rng.rand() < p_a else "model_b"
        copies = 3 if winner.startswith("model") and rng.rand() < 0.3 else 1
        rows += [{"model_a": names[a], "model_b": names[b], "winner": winner}] * copies
    return pd.DataFrame(rows)


# 1. Bradley-Terry ratings = Arena-Hard's compute_mle_elo (through FastChat's fit, made the same).
@pytest.mark.parametrize("seed", [0, 1])
def test_bradley_terry_equals_reference_fit(pd, arena_hard_fit, seed):
    df = synthetic_battles(pd, seed)
    assert {"tie", "tie (bothbad)", "model_a", "model_b"} <= set(df.winner)
    ours = bradley_terry(df, anchor=BASELINE)
    reference = arena_hard_fit(df)
    assert list(ours) == list(reference.index)  # highest first, as the reference's sort_values
    assert ours == pytest.approx(reference.to_dict(), abs=1e-6, rel=0)
    assert ours[BASELINE] == pytest.approx(1000, abs=1e-9)


def test_bradley_terry_scale_and_anchor(pd, arena_hard_fit):
    df = synthetic_battles(pd, 2)
    ours = bradley_terry(df, anchor="model-y")
    reference = arena_hard_fit(df)
    shifted = reference + (1000 - reference["model-y"])
    assert ours == pytest.approx(shifted.to_dict(), abs=1e-6, rel=0)
    # base e, scale 1: the plain logistic coefficients, same differences / (400 / ln 10)
    natural = bradley_terry(df, anchor=BASELINE, scale=1, base=math.e, init_rating=0)
    for model in ours:
        expected = (reference[model] - reference[BASELINE]) * math.log(10) / 400
        assert natural[model] == pytest.approx(expected, abs=1e-6)


# 2. The bootstrap = get_bootstrap_result round for round, with the same seed.
def test_bootstrap_equals_reference_round_for_round(pd, elo_analysis, arena_hard_fit):
    import numpy as np

    df = synthetic_battles(pd, 3, n=200)
    np.random.seed(7)  # the reference draws from numpy's global generator
    reference = elo_analysis.get_bootstrap_result(df, arena_hard_fit, num_round=20)
    ours = bootstrap(df, rounds=20, seed=7, anchor=BASELINE)
    assert list(ours.columns) == list(reference.columns)  # by median, highest first
    assert ours.shape == (20, 4)
    assert np.abs(ours.to_numpy() - reference.to_numpy()).max() < 1e-6
    assert not ours.equals(bootstrap(df, rounds=20, seed=8, anchor=BASELINE))


# 3. Battles from judgments = v0.1 show_result's get_battles_from_judgment. Literals: its data/arena_hard_battles.jsonl
# after `python show_result.py --judge-name judge --output` (commit 3071ef9) with v01_records() as the only judgment
# file, data/arena-hard-v0.1/model_judgment/judge/all.jsonl: one character per battle row, in its order
# (a = model_a i.e. the baseline won, b = model_b i.e. the model won, t = tie), and rows per judgment.
REFERENCE_WINNERS = (
    "aabbbbbbbtbbbtttttbbbbbbabbbbbbtbbtbbbbbbbbbbbabbatataaaataaaaaabaaabtaaaaaaataaabbbbtbabaaabbaaabtbbbaaaaaa"
    "tttbtbaaabtbaaabbbtbbbbataaaattaaa"
)
REFERENCE_ROWS_PER_JUDGMENT = [
    2, 4, 2, 1, 4, 2, 2, 4, 4, 6, 2, 2, 4, 6, 2, 2,
    2, 2, 4, 4, 4, 1, 2, 2, 4, 0, 2, 2, 6, 2, 2, 4,
    2, 4, 1, 6, 4, 2, 2, 1, 4, 2, 6, 2, 4, 4, 2, 4,
]  # fmt: skip


def test_battles_equal_show_result(pd):
    df = battles(v01_records(), BASELINE)
    assert list(df.columns) == ["question_id", "model_a", "model_b", "winner"]
    assert "".join({"model_a": "a", "model_b": "b", "tie": "t"}[w] for w in df.winner) == REFERENCE_WINNERS
    per_judgment = df.groupby(["model_b", "question_id"]).size()
    assert [
        int(per_judgment.get((model, f"q{q:02d}"), 0)) for model in JUDGMENTS for q in range(16)
    ] == REFERENCE_ROWS_PER_JUDGMENT
    assert set(df.model_a) == {BASELINE}
    counts = df.groupby(["model_b", "winner"]).size().to_dict()
    assert counts == {
        ("alpha-z", "model_a"): 23, ("alpha-z", "model_b"): 17, ("alpha-z", "tie"): 10,
        ("model-x", "model_a"): 4, ("model-x", "model_b"): 37, ("model-x", "tie"): 8,
        ("model-y", "model_a"): 29, ("model-y", "model_b"): 8, ("model-y", "tie"): 6,
    }  # fmt: skip


def test_battles_game_order_weight_and_drops(pd):
    def rows(g1, g2, **kwargs):
        df = battles([{"model": "m", "games": [{"score": g1}, {"score": g2}]}], "base", **kwargs)
        return list(df.winner)

    # game 1 has the baseline as A (A wins = model_a), game 2 the model as A (A wins = model_b)
    assert rows("A>B", "A>B") == ["model_a", "model_b"]
    assert rows("B>A", "B>A") == ["model_b", "model_a"]
    assert rows("A>>B", "B>>A") == ["model_a"] * 3 + ["model_a"] * 3
    assert rows("A>>B", "A=B", weight=5) == ["model_a"] * 5 + ["tie"]
    assert rows(None, "A<B") == []  # unparsable and unknown labels give no battle
    assert rows("B>>A", "A>B", first_game_only=True) == ["model_b"] * 3
    bare = battles([{"model": "m", "games": ["A=B", None]}], "base")  # plain verdict strings work too
    assert bare.to_dict("records") == [{"question_id": None, "model_a": "base", "model_b": "m", "winner": "tie"}]
    with pytest.raises(RecordError, match="judgment 1"):
        battles([{"model": "m", "games": ["A=B", "A=B"]}, {"model": "m", "games": ["A=B"]}], "base")
    with pytest.raises(RecordError, match="'model' and 'games'"):
        battles([{"games": ["A=B", "A=B"]}], "base")


# 4. The leaderboard = v0.1 show_result's. Literals: the csv it writes (leaderboard/arena_hard_leaderboard_*.csv:
# model, score, rating_q025, rating_q975) and the lines it prints, from the same run as above (default --num-rounds
# 100, --weight 3, --baseline gpt-4-0314; utils_math seeds numpy with 42); the ratings are its compute_mle_elo on
# those battles and np.percentile(2.5 / 97.5) of its get_bootstrap_result after np.random.seed(42).
REFERENCE_LEADERBOARD = [
    # model, score, lower, upper, printed interval, rating, rating 2.5%, rating 97.5%
    ("model-x", 83.67, 74.7, 91.59, (-9.0, 7.9), 1283.877546436783, 1188.04207323682, 1414.8730140609487),
    ("gpt-4-0314", 50.0, 50.0, 50.0, (0.0, 0.0), 1000.0, 1000.0, 1000.0),
    ("alpha-z", 44.0, 31.31, 56.11, (-12.7, 12.1), 958.1058608450129, 863.5011061596963, 1042.6455205904801),
    ("model-y", 25.58, 15.46, 38.35, (-10.1, 12.8), 814.4970839480256, 704.8982171091975, 917.5237809694154),
]


def test_leaderboard_equals_show_result(pd):
    df = battles(v01_records(), BASELINE)
    board = leaderboard(df, BASELINE, rounds=100, seed=42)
    assert [row["model"] for row in board] == [r[0] for r in REFERENCE_LEADERBOARD]
    for row, (_, score, lower, upper, interval, rating, r_low, r_up) in zip(board, REFERENCE_LEADERBOARD):
        assert (row["score"], row["lower"], row["upper"], row["interval"]) == (score, lower, upper, interval)
        assert row["rating"] == pytest.approx(rating, abs=1e-6)
        assert (row["rating_lower"], row["rating_upper"]) == pytest.approx((r_low, r_up), abs=1e-6)
    assert {row["model"]: row["battles"] for row in board} == {
        "model-x": 49, "model-y": 43, "alpha-z": 50, BASELINE: 142,
    }  # fmt: skip
    with pytest.raises(RecordError, match="baseline 'nobody'"):
        leaderboard(df, "nobody", rounds=2)


# HEAD (v2.0 era) show_result without style control. Literals: HEAD's load_judgments(["judge"], "arena-hard-v0.1")
# on the same judgments in HEAD's layout (uid, category "arena-hard-v0.1", a game None where unparsable), then
# np.random.seed(42) and print_leaderboard(battles, "arena-hard-v0.1"); the unrounded values are the arguments its
# print_leaderboard passed to format_confidence_interval (x 100).
REFERENCE_HEAD = [
    # model, Scores (%), CI (%) as printed, mean, 5%, 95% (x 100)
    ("model-x", 83.2, (-7.2, 7.5), 83.16666666666667, 75.98958333333333, 90.67708333333333),
    ("gpt-4-0314", 50.0, (0.0, 0.0), 50.0, 50.0, 50.0),
    ("alpha-z", 44.3, (-8.7, 7.6), 44.28846153846154, 35.57692307692308, 51.92307692307693),
    ("model-y", 26.4, (-9.7, 10.5), 26.4047619047619, 16.666666666666664, 36.904761904761905),
]


def test_score_leaderboard_equals_head_show_result(pd):
    records = [
        {"uid": r["question_id"], "model": r["model"], "games": [g["score"] for g in r["games"]]} for r in v01_records()
    ]
    table = score_battles(records)
    # per model: rows and summed scores of HEAD's exploded battles ("Number of null judgments found: 3")
    sums = table.groupby("model").score.agg(["count", "sum"])
    assert sums.to_dict("index") == {
        "alpha-z": {"count": 52, "sum": 22.5}, "model-x": {"count": 48, "sum": 40.0},
        "model-y": {"count": 42, "sum": 11.0},
    }  # fmt: skip
    board = score_leaderboard(records, BASELINE, rounds=100, seed=42)
    assert [row["model"] for row in board] == [r[0] for r in REFERENCE_HEAD]
    for row, (_, rounded, interval, score, lower, upper) in zip(board, REFERENCE_HEAD):
        assert (row["rounded"], row["interval"]) == (rounded, interval)
        assert (row["score"], row["lower"], row["upper"]) == pytest.approx((score, lower, upper), abs=1e-9)
    with pytest.raises(RecordError, match="'A>>>B'"):
        score_battles([{"model": "m", "games": ["A>>>B", "A=B"]}])


# 5. The judge's messages = what gen_judgment sends. Literal: the messages both gen_judgment.py versions (3071ef9 with
# config/judge_config.yaml, HEAD with config/arena-hard-v0.1.yaml and utils/judge_utils.py) passed to the API call,
# replaced by a recorder, for judgment() of this question, the baseline answer BASE and the model answer MODEL; the
# two versions sent identical bytes.
SYSTEM_PROMPT = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to the "
    "user prompt displayed below. You will be given assistant A's answer and assistant B's answer. Your job is to "
    "evaluate which assistant's answer is better.\n\nBegin your evaluation by generating your own answer to the "
    "prompt. You must provide your answers before judging any answers.\n\nWhen evaluating the assistants' answers, "
    "compare both assistants' answers with your answer. You must identify and correct any mistakes or inaccurate "
    "information.\n\nThen consider if the assistant's answers are helpful, relevant, and concise. Helpful means the "
    "answer correctly responds to the prompt or follows the instructions. Note when user prompt has any ambiguity or "
    "more than one interpretation, it is more helpful and appropriate to ask for clarifications or more information "
    "from the user than providing an answer based on assumptions. Relevant means all parts of the response closely "
    "connect or are appropriate to what is being asked. Concise means the response is clear and not verbose or "
    "excessive.\n\nThen consider the creativity and novelty of the assistant's answers when needed. Finally, "
    "identify any missing important information in the assistants' answers that would be beneficial to include when "
    "responding to the user prompt.\n\nAfter providing your explanation, you must output only one of the following "
    "choices as your final verdict with a label:\n\n1. Assistant A is significantly better: [[A>>B]]\n2. Assistant "
    "A is slightly better: [[A>B]]\n3. Tie, relatively the same: [[A=B]]\n4. Assistant B is slightly better: "
    '[[B>A]]\n5. Assistant B is significantly better: [[B>>A]]\n\nExample output: "My final verdict is tie: '
    '[[A=B]]".'
)
TEMPLATE_V01 = (
    "<|User Prompt|>\n{question_1}\n\n<|The Start of Assistant A's Answer|>\n{answer_1}\n<|The End of Assistant A's "
    "Answer|>\n\n<|The Start of Assistant B's Answer|>\n{answer_2}\n<|The End of Assistant B's Answer|>"
)
TEMPLATE_HEAD = (
    "<|User Prompt|>\n{QUESTION}\n\n<|The Start of Assistant A's Answer|>\n{ANSWER_A}\n<|The End of Assistant A's "
    "Answer|>\n\n<|The Start of Assistant B's Answer|>\n{ANSWER_B}\n<|The End of Assistant B's Answer|>"
)
QUESTION = 'Format {"a": 1} with "{x}" and {0}\nthen {QUESTION} {question_1} — naïve café 🚀\n'
BASE = "Baseline: use str.format → {answer_2} {ANSWER_B}\n\n```py\nd = {}\n```"
MODEL = "Model: ünïcödé 中文 {ANSWER_A} {answer_1} }{ "
GAME_1_USER = (
    '<|User Prompt|>\nFormat {"a": 1} with "{x}" and {0}\nthen {QUESTION} {question_1} — naïve café 🚀\n\n\n'
    "<|The Start of Assistant A's Answer|>\nBaseline: use str.format → {answer_2} {ANSWER_B}\n\n```py\nd = {}\n```\n"
    "<|The End of Assistant A's Answer|>\n\n<|The Start of Assistant B's Answer|>\nModel: ünïcödé 中文 {ANSWER_A} "
    "{answer_1} }{ \n<|The End of Assistant B's Answer|>"
)
GAME_2_USER = (
    '<|User Prompt|>\nFormat {"a": 1} with "{x}" and {0}\nthen {QUESTION} {question_1} — naïve café 🚀\n\n\n'
    "<|The Start of Assistant A's Answer|>\nModel: ünïcödé 中文 {ANSWER_A} {answer_1} }{ \n<|The End of Assistant "
    "A's Answer|>\n\n<|The Start of Assistant B's Answer|>\nBaseline: use str.format → {answer_2} {ANSWER_B}\n\n"
    "```py\nd = {}\n```\n<|The End of Assistant B's Answer|>"
)


@pytest.mark.parametrize("template", [TEMPLATE_V01, TEMPLATE_HEAD], ids=["v0.1", "head"])
def test_judge_messages_equal_gen_judgment(template):
    expected = [
        [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
        for user in (GAME_1_USER, GAME_2_USER)
    ]
    assert judge_messages(SYSTEM_PROMPT, template, QUESTION, BASE, MODEL) == expected[0]
    assert list(pairwise_messages(SYSTEM_PROMPT, template, QUESTION, BASE, MODEL)) == expected
    got = judge_messages(SYSTEM_PROMPT, template, QUESTION, BASE, MODEL)[1]["content"].encode()
    assert got == GAME_1_USER.encode()


def test_judge_messages_reference_and_bad_template():
    with_reference = "Q: {question_1}\nRef: {ref_answer_1}\nA: {answer_1}\nB: {answer_2}"
    assert judge_messages("s", with_reference, "q", "a", "b", reference="{r}")[1]["content"] == (
        "Q: q\nRef: {r}\nA: a\nB: b"
    )
    assert judge_messages("s", "{REFERENCE}|{ANSWER_B}", "q", "a", "b", "r")[1]["content"] == "r|b"
    with pytest.raises(ConfigError, match="cannot be filled"):
        judge_messages("s", "{REFERENCE}", "q", "a", "b")  # no reference given, as gen_judgment would fail
    with pytest.raises(ConfigError, match="cannot be filled"):
        judge_messages("s", "{question}", "q", "a", "b")


# 6. Verdicts = gen_judgment's get_score. Literals: the get_score functions of 3071ef9 (with re.compile of
# judge_config's regex_pattern) and of HEAD (with arena-hard-v0.1.yaml's two regex_patterns), executed on these texts.
V01 = r"\[\[([AB<>=]+)\]\]"
HEAD_PATTERNS = [r"\[\[([AB<>=]+)\]\]", r"\[([AB<>=]+)\]"]
VERDICT_CASES = [
    # text, v0.1 (score, try_again), HEAD with both patterns
    ("Assistant B is better.\n\nMy final verdict is: [[B>A]]", ("B>A", False), "B>A"),
    ("[[A>>B]] ... so again: [[A>>B]]", ("A>>B", False), "A>>B"),
    ("First I thought [[A>B]], but in the end [[B>A]]", (None, False), "B>A"),
    ("Both answers are fine; I cannot decide.", (None, True), None),
    ("Verdict:[[A=B]]and nothing else", ("A=B", False), "A=B"),
    ("My final verdict is [B>>A].", (None, True), "B>>A"),
    ("my final verdict: [[a>b]]", (None, True), "A>B"),
    ("[[]] then [[A>B]]", ("A>B", False), "A>B"),
    ("\nI need more thought.\nFinal verdict: [[A>B]]", ("A>B", False), "A>B"),  # v0.1's two replies joined
]


@pytest.mark.parametrize(("text", "v01", "head"), VERDICT_CASES)
def test_parse_verdict_equals_get_score(text, v01, head):
    assert parse_verdict(text, V01) == v01[0]
    assert needs_retry(text, V01) is v01[1]
    assert parse_verdict(text, HEAD_PATTERNS, rules="v2.0") == head


def test_parse_verdict_settings():
    with pytest.raises(ConfigError, match="one verdict pattern"):
        parse_verdict("[[A>B]]", HEAD_PATTERNS)
    with pytest.raises(ConfigError, match="rules"):
        parse_verdict("[[A>B]]", V01, rules="v3")
    with pytest.raises(ConfigError, match="not a regular expression"):
        parse_verdict("[[A>B]]", "(A")


def test_lopsided_battles_are_rated_where_the_reference_stops(pd):
    """A weak model (every game lost but one tie) makes bootstrap resamples with one outcome, on which Arena-Hard's
    show_result stops with sklearn's error: here those rounds are skipped and counted; the rest is the same fit. A
    model that lost every battle gets 0 with no rating (no finite one exists)."""
    from gpt4llm.evaluation import arena_hard as AH

    judgments = [{"question_id": i, "model": "weak", "games": ["A>>B", "B>>A"]} for i in range(30)]
    judgments.append({"question_id": 30, "model": "weak", "games": ["A=B", "B>A"]})
    rows = {r["model"]: r for r in AH.leaderboard(AH.battles(judgments), rounds=50, seed=42)}
    assert rows["weak"]["skipped_rounds"] > 0 and rows["weak"]["score"] < 2
    assert rows["weak"]["rating"] == AH.bradley_terry(AH.battles(judgments))["weak"]
    assert rows["gpt-4-0314"]["score"] == 50.0
    lost = AH.leaderboard(AH.battles(judgments[:30]), rounds=50, seed=42)
    assert [(r["model"], r["score"], r["rating"]) for r in lost] == [("gpt-4-0314", 50.0, None), ("weak", 0.0, None)]
    won = AH.leaderboard(AH.battles([{"model": "strong", "games": ["B>A", "A>B"]}]), rounds=5)
    assert [(r["model"], r["score"]) for r in won] == [("strong", 100.0), ("gpt-4-0314", 50.0)]


# 7. Style control = v0.1 show_result.py --style-control / --length-control-only / --markdown-control-only.
def fixed_features():
    """Each model's answers' conv_metadata for q00..q15 (the baseline's too), as Arena-Hard's answer files hold it:
    token_len and dicts of markdown counts, drawn from random.Random(20240402).random(); model-x writes longer and
    more markdown, model-y shorter and less."""
    rng = random.Random(20240402)
    length = {BASELINE: 400, "model-x": 700, "model-y": 250, "alpha-z": 500}
    markdown = {BASELINE: 1.0, "model-x": 2.0, "model-y": 0.5, "alpha-z": 1.0}
    features = {}
    for model in length:
        features[model] = {}
        for q in range(16):
            u = [rng.random() for _ in range(8)]
            f = markdown[model]
            features[model][f"q{q:02d}"] = {
                "token_len": int(length[model] * (0.5 + u[0])),
                "header_count": {"h1": int(2 * u[1]), "h2": int(4 * f * u[2]), "h3": int(3 * f * u[3]), "h4": 0,
                                 "h5": 0, "h6": 0},
                "list_count": {"ordered": int(8 * f * u[4]), "unordered": int(10 * f * u[5])},
                "bold_count": {"**": int(6 * f * u[6]), "__": int(2 * u[7])},
            }  # fmt: skip
    return features


# Literals: commit 3071ef9's show_result.py run from a scratch directory as `python show_result.py --judge-name judge
# --output` plus the flag, on v01_records() as the only judgment file and one answer file per model whose
# conv_metadata is fixed_features(); score/lower/upper are its csv's score, rating_q025, rating_q975 and the interval
# its printed "95% CI" (the printed scores and "average #tokens" agree). Unrounded: its main block's steps for the
# flag called one by one in a fresh process (utils_math's np.random.seed(42) on import):
# get_battles_from_judgment(..., style_control=True), construct_style_matrices (apply_ratio and style_elements as
# show_result passes them), fit_bt(X, Y, models, baseline_model="gpt-4-0314"), then
# get_bootstrap_result_style_control(X, Y, battles, models, fit_bt, num_round=100): the ratings, style
# coefficients and np.percentile(..., 2.5 / 97.5) of each bootstrap column. Our bootstrap table equalled its table
# exactly (and our X, Y its matrices).
REFERENCE_STYLE = {
    "style": (
        [
            # model, score, lower, upper, printed interval, rating, rating 2.5%, rating 97.5%
            ("model-x", 81.27, 62.11, 92.4, (-19.2, 11.1), 1368.9101536975347, 1199.8471780333305, 1547.9491467627565),
            ("gpt-4-0314", 50.0, 50.0, 50.0, (0.0, 0.0), 1114.0, 1114.0, 1114.0),
            ("alpha-z", 45.13, 32.42, 57.8, (-12.7, 12.7), 1080.0482675074938, 986.3871526445749, 1168.6429268298186),
            ("model-y", 28.1, 12.73, 51.79, (-15.4, 23.7), 950.7770797816439, 779.6366039164135, 1126.4221787618658),
        ],
        # fit_bt's style coefficients; printed as "Style Coefficients: {...}" rounded to 3
        {
            "sum_assistant_a_tokens": -0.09806907315601478, "header_count_a": 0.1227988809762173,
            "list_count_a": 0.04947039474149296, "bold_count_a": 0.09261796470373204,
        },
        {"sum_assistant_a_tokens": -0.098, "header_count_a": 0.123, "list_count_a": 0.049, "bold_count_a": 0.093},
    ),
    "length": (
        [
            ("model-x", 84.3, 74.26, 92.74, (-10.0, 8.4), 1406.0066178348125, 1298.0285141940635, 1556.444149480865),
            ("gpt-4-0314", 50.0, 50.0, 50.0, (0.0, 0.0), 1114.0, 1114.0, 1114.0),
            ("alpha-z", 44.22, 32.29, 55.81, (-11.9, 11.6), 1073.6342720128496, 985.372733801196, 1154.529094131478),
            ("model-y", 24.25, 13.28, 37.8, (-11.0, 13.5), 916.0969819586138, 788.0961612155672, 1027.4970731421981),
        ],
        {"sum_assistant_a_tokens": -0.09893464307256007},
        {"sum_assistant_a_tokens": -0.099},
    ),
    "markdown": (
        [
            ("model-x", 80.63, 63.62, 91.5, (-17.0, 10.9), 1361.7610091141437, 1211.1213782791187, 1526.7548584427163),
            ("gpt-4-0314", 50.0, 50.0, 50.0, (0.0, 0.0), 1114.0, 1114.0, 1114.0),
            ("alpha-z", 45.07, 32.8, 57.84, (-12.3, 12.8), 1079.6265251427749, 989.4112915339222, 1168.9479335861463),
            ("model-y", 29.11, 16.73, 51.74, (-12.4, 22.6), 959.3941870802585, 835.2390332759516, 1126.0767229805122),
        ],
        {
            "header_count_a": 0.13337896868382484, "list_count_a": 0.012949455975970844,
            "bold_count_a": 0.08690541199254587,
        },
        {"header_count_a": 0.133, "list_count_a": 0.013, "bold_count_a": 0.087},
    ),
}  # fmt: skip


@pytest.mark.parametrize("control", ["style", "length", "markdown"])
def test_style_leaderboard_equals_show_result(pd, control):
    expected_rows, coefficients, displayed = REFERENCE_STYLE[control]
    df = battles(v01_records(), BASELINE, features=fixed_features())
    board = style_leaderboard(df, BASELINE, control=control, rounds=100, seed=42)
    assert board["control"] == control
    assert [row["model"] for row in board["rows"]] == [r[0] for r in expected_rows]
    for row, (_, score, lower, upper, interval, rating, r_low, r_up) in zip(board["rows"], expected_rows):
        assert (row["score"], row["lower"], row["upper"], row["interval"]) == (score, lower, upper, interval)
        assert row["rating"] == pytest.approx(rating, abs=1e-6)
        assert (row["rating_lower"], row["rating_upper"]) == pytest.approx((r_low, r_up), abs=1e-6)
        assert row["skipped_rounds"] == 0
    assert board["coefficients"] == pytest.approx(coefficients, abs=1e-9)
    assert list(board["coefficients"]) == list(coefficients)  # the order show_result prints them in
    assert board["displayed"] == displayed
    ratings, fitted = style_bradley_terry(df, control, anchor=BASELINE)
    assert list(ratings) == [r[0] for r in expected_rows] and fitted == board["coefficients"]


def test_style_battles_carry_both_answers_features(pd):
    features = fixed_features()
    df = battles(v01_records(), BASELINE, features=features)
    assert len(df) == 142 and list(df.columns[:4]) == ["question_id", "model_a", "model_b", "winner"]
    first = df.iloc[0]  # model-x on q00: the baseline's features as _a, the model's as _b, dict counts summed
    base, model = features[BASELINE]["q00"], features["model-x"]["q00"]
    assert (first.sum_assistant_a_tokens, first.sum_assistant_b_tokens) == (base["token_len"], model["token_len"])
    assert (first.header_count_a, first.header_count_b) == (
        sum(base["header_count"].values()),
        sum(model["header_count"].values()),
    )
    # counts given as plain ints are the same thing (construct_style_matrices takes either)
    flat = {
        m: {
            q: {k: v if isinstance(v, int) else sum(v.values()) for k, v in meta.items()} for q, meta in answers.items()
        }
        for m, answers in features.items()
    }
    assert battles(v01_records(), BASELINE, features=flat).equals(df)
    assert average_tokens(features) == {BASELINE: 403, "model-x": 633, "model-y": 270, "alpha-z": 463}  # printed
    del features["model-y"]["q09"]  # a judgment with no verdict at all still needs its answers, as in the reference
    with pytest.raises(RecordError, match="'model-y' on question 'q09' are missing"):
        battles(v01_records(), BASELINE, features=features)
    with pytest.raises(ConfigError, match="features="):
        style_leaderboard(battles(v01_records(), BASELINE))
    with pytest.raises(ConfigError, match="style control must be one of"):
        style_leaderboard(df, control="verbosity")
    with pytest.raises(RecordError, match="baseline 'nobody'"):
        style_leaderboard(df, "nobody", rounds=2)


def test_style_control_departures(pd):
    """Where the reference fails or mislabels: a feature with one value everywhere (it divides by a zero deviation
    and its fit fails on NaN) gets coefficient 0 and leaves the rest as without it; a model missing from a bootstrap
    round (it shifts later models' names) gets NaN there; one-outcome battles and rounds as in `leaderboard`."""
    import numpy as np

    plain = {}
    for model, answers in fixed_features().items():
        plain[model] = {q: {"token_len": meta["token_len"], "header_count": 0, "list_count": 0, "bold_count": 2}
                        for q, meta in answers.items()}  # fmt: skip
    df = battles(v01_records(), BASELINE, features=plain)
    x, _, models = style_matrices(df, "style")
    assert not x[:, len(models) + 1 :].any()
    style = style_leaderboard(df, control="style", rounds=20)
    length = style_leaderboard(df, control="length", rounds=20)
    assert style["displayed"] | {"sum_assistant_a_tokens": 0} == dict.fromkeys(style["displayed"], 0)
    assert style["coefficients"]["sum_assistant_a_tokens"] == pytest.approx(
        length["coefficients"]["sum_assistant_a_tokens"], abs=1e-9
    )
    assert {r["model"]: r["rating"] for r in style["rows"]} == pytest.approx(
        {r["model"]: r["rating"] for r in length["rows"]}, abs=1e-6
    )

    rare = [{"question_id": "q00", "model": "rare", "games": ["A>B", "B>A"]}]
    plain["rare"] = {"q00": plain["model-x"]["q00"]}
    table = style_bootstrap(battles(v01_records() + rare, BASELINE, features=plain), "length", rounds=30, seed=1)
    assert table["rare"].isna().any() and table["rare"].notna().any()
    assert table.drop(columns="rare").notna().all().all()

    weak = {BASELINE: {}, "weak": {}}
    judgments = []
    for i in range(31):
        weak[BASELINE][i], weak["weak"][i] = {"token_len": 100 + i, "header_count": i % 3, "list_count": 1,
                                              "bold_count": i % 2}, {"token_len": 50, "header_count": 0,
                                              "list_count": i % 4, "bold_count": 0}  # fmt: skip
        games = ["A=B", "B>A"] if i == 30 else ["A>>B", "B>>A"]
        judgments.append({"question_id": i, "model": "weak", "games": games})
    board = style_leaderboard(battles(judgments, features=weak), rounds=50)
    rows = {r["model"]: r for r in board["rows"]}
    assert rows["weak"]["skipped_rounds"] > 0 and rows["weak"]["score"] < 10
    assert rows["weak"]["rating"] == style_bradley_terry(battles(judgments, features=weak))[0]["weak"]
    assert np.isfinite(list(board["coefficients"].values())).all()
    lost = style_leaderboard(battles(judgments[:30], features=weak), rounds=50)
    assert [(r["model"], r["score"], r["rating"]) for r in lost["rows"]] == [
        (BASELINE, 50.0, None),
        ("weak", 0.0, None),
    ]
    assert lost["coefficients"] is None and lost["displayed"] is None
