"""Arena-Hard-Auto (metric=arena_hard): the judge's prompt and verdict, battles, Bradley-Terry ratings, the bootstrap
and the leaderboard, as lmarena/arena-hard-auto computes them. Only the pure computations; the runner generates the
answers, calls the judge and pins the files below.

Reproduced, for the v0.1 benchmark (500 questions, baseline gpt-4-0314, judge gpt-4-1106-preview, two games per
question with the baseline as assistant A in game 1 and as B in game 2), from the last v0.1-era commit
3071ef95d913bb5cd632641db336a3b6c7fe4bdd (2025-03-19):
- gen_judgment.py (blob 6afa7544): the messages of one game (`judge_messages`) and `get_score` (`parse_verdict`,
  rules="v0.1"), with its second attempt when no verdict is found (`RETRY_PROMPT`, `JUDGMENT_ATTEMPTS`);
- show_result.py (blob 21c5eb95): `get_battles_from_row` (`battles`), the leaderboard of its main block
  (`leaderboard`), with utils_math.py (blob 8d2c7aa4): `compute_mle_elo` (`bradley_terry`), `get_bootstrap_result`
  (`bootstrap`, seeded 42 as utils_math does on import) and `predict_win_rate` / `get_win_rate_column`.
From HEAD 196f6b826783b3da7310e361a805fa36f0be83f3 (2025-06-20, v2.0 era), which still runs v0.1 with
config/arena-hard-v0.1.yaml: its `get_score` (parse_verdict rules="v2.0": the text upper-cased, a list of patterns,
the last match) and its show_result.py (blob aa9f2a2b) without style control: `load_judgments` + `print_leaderboard`
(`score_battles`, `score_leaderboard`: the mean of per-game scores, not Bradley-Terry).
Style control, v0.1 era (show_result.py `--style-control`, `--length-control-only`, `--markdown-control-only`;
utils_math.py `construct_style_matrices`, `fit_bt`, `get_bootstrap_result_style_control`): `battles(features=...)`,
`style_matrices`, `style_bradley_terry`, `style_bootstrap`, `style_leaderboard`, and its "average #tokens" column
(`average_tokens`); the features of each answer come from `answer_style.style_features` (gen_answer.py's
conv_metadata). Not reproduced: HEAD's `--control-features` (a torch fit of its own, utils/math_utils.py).

Pinned inputs (raw.githubusercontent.com/lmarena/arena-hard-auto/<commit>/<path>, git blob id):
- questions, HEAD layout (uid, category, cluster, prompt): .../196f6b826783b3da7310e361a805fa36f0be83f3/
  data/arena-hard-v0.1/question.jsonl, blob a0ab23b91e2d66b07e300f111a319ec4fbcbc0d3 (500 lines); the same 500
  prompts in the v0.1 layout (question_id, turns) at .../3071ef95d913bb5cd632641db336a3b6c7fe4bdd/
  data/arena-hard-v0.1/question.jsonl, blob 597d9bcbbb6e8afd9b6bf8ea982482d33d752ea4;
- judge config, v0.1 era (judge, temperature 0, max_tokens 4096, regex_pattern, number_of_judgment_attempts 2,
  system_prompt, prompt_template): .../3071ef95d913bb5cd632641db336a3b6c7fe4bdd/config/judge_config.yaml,
  blob e31c4f1e3b17bb94cb7d584630250e3f7eeb5796; HEAD's: .../196f6b826783b3da7310e361a805fa36f0be83f3/
  config/arena-hard-v0.1.yaml, blob 926a7c93b5e2876fb829022c7d6a732fc557a69c (no system prompt: HEAD takes it from
  utils/judge_utils.py, blob 21de9f77b5ae8f7d6d2fe31715235eb59570cdb6, the same text);
- baseline answers (gpt-4-0314): .../196f6b826783b3da7310e361a805fa36f0be83f3/
  data/arena-hard-v0.1/model_answer/gpt-4-0314.jsonl, blob 13572d720fba05b243bfce713b5a647593c25349 (the answer
  is messages[-1].content.answer); the README documents the full answer/judgment set in the HF dataset
  lmarena-ai/arena-hard-auto (`git clone git@hf.co:datasets/lmarena-ai/arena-hard-auto`, its data/ directory).

Where we differ from the reference on purpose (none of it changes a v0.1 run against gpt-4-0314):
- the bootstrap is anchored at the given baseline; the reference's `get_bootstrap_result` means to, but puts the
  name in its kwargs under the wrong key, so its rounds are always anchored at gpt-4-0314;
- the seeded draws come from a private numpy RandomState, not the global one (same numbers, no side effect);
- battle order is the order of the judgments given; the reference's follows glob() over its judgment files, so a
  seeded bootstrap gives the reference's numbers when the judgments come in that order;
- HEAD's show_result keeps only the last "/"-part of model names; we keep names as given;
- style control: a feature with the same value in every battle is a column of zeros (coefficient 0), where the
  reference divides by a zero deviation and fails; a bootstrap round without one of the models gives it NaN, where
  the reference renames the later models' ratings; rounds with one outcome are skipped and counted, and one-outcome
  battles give 0 / 100, as without style control.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from gpt4llm.errors import ConfigError, RecordError

if TYPE_CHECKING:
    import pandas as pd

BASELINE = "gpt-4-0314"
JUDGE_MODEL = "gpt-4-1106-preview"
VERDICT_PATTERN = r"\[\[([AB<>=]+)\]\]"  # v0.1 judge_config.yaml regex_pattern
HEAD_VERDICT_PATTERNS = (r"\[\[([AB<>=]+)\]\]", r"\[([AB<>=]+)\]")  # HEAD arena-hard-v0.1.yaml regex_patterns
# v0.1 gen_judgment: when a reply holds no verdict, the judge is asked once more with this user turn.
RETRY_PROMPT = "continue your judgment and finish by outputting a final verdict label"
JUDGMENT_ATTEMPTS = 2
SEED = 42  # utils_math.py seeds numpy's global generator with 42 on import, and nothing draws before the bootstrap
RULES = ("v0.1", "v2.0")

# Game 1's verdict -> (winner with the baseline as model_a, strong: `weight` rows). Game 1 has the baseline as
# assistant A, so "A" is model_a; game 2 has the model as A, so "A" is model_b. Other verdicts (None, "A<B") give none.
_GAME_1 = {"A>>B": ("model_a", True), "A>B": ("model_a", False), "A=B": ("tie", False)}
_GAME_1 |= {"B>A": ("model_b", False), "B>>A": ("model_b", True)}
_SWAP = {"model_a": "model_b", "model_b": "model_a", "tie": "tie"}

# Style control (v0.1 utils_math.py): per conv_metadata feature, get_battles_from_row's battle columns for the baseline
# (model_a) and the model (model_b). The model_a name is the name show_result prints for the feature's coefficient.
_STYLE_COLUMNS = {
    "token_len": ("sum_assistant_a_tokens", "sum_assistant_b_tokens"),
    "header_count": ("header_count_a", "header_count_b"),
    "list_count": ("list_count_a", "list_count_b"),
    "bold_count": ("bold_count_a", "bold_count_b"),
}
# The features of show_result's --style-control (STYLE_CONTROL_ELEMENTS), --length-control-only
# (LENGTH_CONTROL_ELEMENTS) and --markdown-control-only (MARKDOWN_CONTROL_ELEMENTS); each passes an apply_ratio of
# all ones, so every feature is taken as a ratio there.
STYLE_CONTROLS = {
    "style": ("token_len", "header_count", "list_count", "bold_count"),
    "length": ("token_len",),
    "markdown": ("header_count", "list_count", "bold_count"),
}
STYLE_ANCHOR_RATING = 1114  # fit_bt moves the baseline to 1114, not compute_mle_elo's 1000 (win rates do not change)

# HEAD show_result's label_to_score: (A's score, strong) per label, a strong one repeated `weight` times. Game 2
# has the model as A; for game 1 (baseline as A) it takes 1 - each. HEAD knows these ten labels and fails on others.
_HEAD_SCORES = {"A>B": (1, False), "A>>B": (1, True), "A=B": (0.5, False), "A<<B": (0, True), "A<B": (0, False)}
_HEAD_SCORES |= {"B>A": (0, False), "B>>A": (0, True), "B=A": (0.5, False), "B<<A": (1, True), "B<A": (1, False)}


def judge_messages(
    system_prompt: str,
    prompt_template: str,
    question: str,
    answer_a: str,
    answer_b: str,
    reference: str | None = None,
) -> list[dict]:
    """The messages of one game: the system prompt, then the template filled with str.format.

    Both generations of placeholders are filled: v0.1's {question_1} {answer_1} {answer_2} {ref_answer_1} and HEAD's
    {QUESTION} {ANSWER_A} {ANSWER_B} {REFERENCE}; the values are inserted as they are, so braces in a question or an
    answer stay literal. As in gen_judgment, an empty reference counts as none."""
    fields = {"question_1": question, "answer_1": answer_a, "answer_2": answer_b}
    fields |= {"QUESTION": question, "ANSWER_A": answer_a, "ANSWER_B": answer_b}
    if reference:
        fields |= {"ref_answer_1": reference, "REFERENCE": reference}
    try:
        user = prompt_template.format(**fields)
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(
            f"arena_hard prompt_template cannot be filled ({type(e).__name__}: {e}); it may use {sorted(fields)}, "
            "and literal braces must be doubled"
        ) from e
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": user}]


def pairwise_messages(
    system_prompt: str,
    prompt_template: str,
    question: str,
    baseline_answer: str,
    model_answer: str,
    reference: str | None = None,
) -> tuple[list[dict], list[dict]]:
    """The two games of a question in gen_judgment's order: game 1 with the baseline as A, game 2 with the model as A.
    `battles` reads the verdicts in this order."""
    args = (system_prompt, prompt_template, question)
    return (
        judge_messages(*args, baseline_answer, model_answer, reference),
        judge_messages(*args, model_answer, baseline_answer, reference),
    )


def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"arena_hard verdict pattern {pattern!r} is not a regular expression: {e}") from e


def _patterns(pattern: str | Sequence[str]) -> list[str]:
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    if not patterns:
        raise ConfigError("arena_hard needs at least one verdict pattern, e.g. " + VERDICT_PATTERN)
    return patterns


def parse_verdict(text: str, pattern: str | Sequence[str] = VERDICT_PATTERN, rules: str = "v0.1") -> str | None:
    """The verdict label in a judgment, or None when it has none usable (never to be scored).

    rules="v0.1" (gen_judgment at 3071ef9): one pattern, matched on the text as it is; the non-empty matches must all
    be the same label, which is returned; none, or two different labels, give None. v0.1 asks the judge again only
    when there is no match (see `needs_retry`) and reads the verdict from all replies joined, each after a newline.
    rules="v2.0" (HEAD): the text upper-cased; the first pattern with a non-empty match gives its last match.
    The patterns are meant to have one group (findall then returns that group)."""
    patterns = _patterns(pattern)
    if rules == "v0.1":
        if len(patterns) != 1:
            raise ConfigError(f"arena_hard rules v0.1 take one verdict pattern, got {len(patterns)}")
        matches = [m for m in _compile(patterns[0]).findall(text) if m != ""]
        return matches[0].strip("\n") if len(set(matches)) == 1 else None
    if rules == "v2.0":
        for p in patterns:
            matches = [m for m in _compile(p).findall(text.upper()) if m != ""]
            if matches:
                return matches[-1].strip("\n")
        return None
    raise ConfigError(f"arena_hard verdict rules must be one of {RULES}, got {rules!r}")


def needs_retry(text: str, pattern: str = VERDICT_PATTERN) -> bool:
    """v0.1's try_again: True when the judgment has no verdict at all (not when it has two different ones). The
    runner then appends the reply as an assistant turn and RETRY_PROMPT as a user turn, up to JUDGMENT_ATTEMPTS
    replies, and parses "\\n" + reply 1 + "\\n" + reply 2."""
    return not [m for m in _compile(pattern).findall(text) if m != ""]


def _games(record: Any, i: int, count: int) -> list:
    if not isinstance(record, dict) or "model" not in record or "games" not in record:
        raise RecordError(f"arena_hard judgment {i} needs 'model' and 'games' (the verdicts of game 1 and game 2)")
    games = record["games"]
    if not isinstance(games, list | tuple) or len(games) < count:
        raise RecordError(f"arena_hard judgment {i} (model {record['model']!r}): 'games' must hold {count} games")
    return list(games)


def _verdict(game: Any) -> str | None:
    """A game is a verdict string (or None) or Arena-Hard's game record {"score": verdict, ...} (or None)."""
    return game.get("score") if isinstance(game, dict) else game


def battles(
    judgments: list[dict],
    baseline: str = BASELINE,
    weight: int = 3,
    first_game_only: bool = False,
    features: Mapping[str, Mapping[Any, Mapping[str, Any]]] | None = None,
) -> pd.DataFrame:
    """v0.1 show_result's battles: per judgment (Arena-Hard's record: "model", "games" with the verdicts of game 1,
    the baseline as A, and game 2, the model as A; "question_id" or "uid" kept when present) one row per game with
    model_a = the baseline, model_b = the model and winner model_a / model_b / tie; a strong verdict (>>) gives
    `weight` identical rows; a game without one of the five labels gives none.

    For style control (`style_leaderboard`), `features` maps model -> question id -> that answer's conv_metadata
    (`answer_style.style_features`, or the "conv_metadata" of Arena-Hard's answer files): it must hold the baseline's
    and every judged model's answer to every judged question. Each row then gets the baseline's and the model's
    features under get_battles_from_row's names (sum_assistant_a_tokens / _b_tokens, header_count_a / _b,
    list_count_a / _b, bold_count_a / _b; a count given as a dict is summed, as construct_style_matrices does)."""
    import pandas as pd

    if weight < 1:
        raise ConfigError(f"arena_hard weight must be at least 1, got {weight}")
    columns = ["question_id", "model_a", "model_b", "winner"]
    if features is not None:
        columns += [column for pair in _STYLE_COLUMNS.values() for column in pair]
    rows = []
    for i, record in enumerate(judgments):
        games = _games(record, i, 1 if first_game_only else 2)
        question_id = record.get("question_id", record.get("uid"))
        # Looked up for every judgment, a game without a verdict too, as get_battles_from_row does.
        style = {} if features is None else _battle_features(features, baseline, record["model"], question_id, i)
        for number, game in enumerate(games[: 1 if first_game_only else 2]):
            verdict = _verdict(game)
            outcome = _GAME_1.get(verdict) if isinstance(verdict, str) else None
            if outcome is None:
                continue
            winner, strong = outcome
            row = {"question_id": question_id, "model_a": baseline, "model_b": record["model"]}
            row["winner"] = _SWAP[winner] if number == 1 else winner
            rows += [row | style] * (weight if strong else 1)
    return pd.DataFrame(rows, columns=columns)


def _feature_value(metadata: Mapping[str, Any], name: str, where: str) -> int:
    """One conv_metadata entry as a number: an int, or a dict of counts summed (header_count: {"h1": .., ...})."""
    value = metadata.get(name) if isinstance(metadata, Mapping) else None
    if isinstance(value, Mapping):
        value = sum(value.values())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise RecordError(f"arena_hard style features {where}: {name!r} must be a count or a dict of counts")
    return int(value)


def _battle_features(features: Mapping, baseline: str, model: str, question_id: Any, i: int) -> dict[str, int]:
    if question_id is None:
        raise RecordError(f"arena_hard judgment {i} has no 'question_id' (or 'uid') to find its answers' features")
    style = {}
    for side, name in ((0, baseline), (1, model)):
        metadata = features.get(name, {}).get(question_id)
        where = f"of {name!r} on question {question_id!r}"
        if metadata is None:
            raise RecordError(
                f"arena_hard style features {where} are missing (judgment {i}); pass the features of the baseline's "
                "and every judged model's answers"
            )
        for feature, pair in _STYLE_COLUMNS.items():
            style[pair[side]] = _feature_value(metadata, feature, where)
    return style


def _unpenalized_logistic_regression(tol: float):
    """compute_mle_elo's LogisticRegression(fit_intercept=False, penalty=None, tol=1e-8): a plain maximum likelihood
    fit. scikit-learn 1.8 deprecated `penalty` for C=inf (the same fit), so ask for it the way the version wants."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    if LogisticRegression().get_params().get("penalty") == "deprecated":
        return LogisticRegression(fit_intercept=False, C=np.inf, tol=tol)
    return LogisticRegression(fit_intercept=False, penalty=None, tol=tol)


class OneOutcome(RecordError):
    """Every battle has the same winner: the logistic regression has one class and no finite rating exists."""


def bradley_terry(
    battles: pd.DataFrame, anchor: str = BASELINE, scale: float = 400, base: float = 10, init_rating: float = 1000
) -> dict[str, float]:
    """Maximum likelihood Elo (Bradley-Terry) of compute_mle_elo: P(a beats b) = 1 / (1 + base^((R_b - R_a) / scale)),
    fit as a logistic regression on the battles written twice, a tie counted as one win for each side; the anchor
    is then moved to init_rating (left as fit if it has no battle). Highest rating first."""
    import numpy as np
    import pandas as pd

    if len(battles) == 0:
        raise RecordError("arena_hard has no battles to rate (every verdict unparsable, or no judgments)")
    # Column order = first appearance in model_a then model_b, as the reference, so the solver sees the same matrix.
    models = pd.unique(pd.concat([battles["model_a"], battles["model_b"]]).to_numpy())
    column = {m: j for j, m in enumerate(models)}
    n = len(battles)
    rows = np.arange(2 * n)
    x = np.zeros((2 * n, len(models)))
    x[rows, np.tile(battles["model_a"].map(column).to_numpy(), 2)] = +math.log(base)
    x[rows, np.tile(battles["model_b"].map(column).to_numpy(), 2)] = -math.log(base)
    winner = battles["winner"].to_numpy()
    a_won = winner == "model_a"
    tie = (winner == "tie") | (winner == "tie (bothbad)")
    # First copy: A wins and ties are 1; second copy: A wins only, so a tie is half a win for each side.
    y = np.concatenate([a_won | tie, a_won]).astype(float)
    if y.min() == y.max():
        raise OneOutcome(f"arena_hard battles all have one outcome ({winner[0]}); no rating can be fit")
    fit = _unpenalized_logistic_regression(tol=1e-8).fit(x, y)
    ratings = scale * fit.coef_[0] + init_rating
    if anchor in column:
        ratings += init_rating - ratings[column[anchor]]
    ranked = pd.Series(ratings, index=models).sort_values(ascending=False)
    return {str(m): float(r) for m, r in ranked.items()}


def _one_blas_thread():
    """The bootstrap's many small fits on one BLAS thread: scipy's L-BFGS-B calls BLAS on vectors of a few entries,
    and a multithreaded BLAS pays its thread handoff on each call (a fit took 90 ms instead of 2 ms on 2 busy cores).
    The sums are the same, so are the numbers. A no-op without threadpoolctl (a scikit-learn dependency)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def bootstrap(
    battles: pd.DataFrame, rounds: int = 100, seed: int | None = SEED, anchor: str = BASELINE
) -> pd.DataFrame:
    """get_bootstrap_result: `rounds` resamples of the battles (rows drawn with replacement, as many as there are),
    each rated by `bradley_terry`; one row per round, models as columns by median rating, highest first (NaN where a
    model drew no battle). The draws are DataFrame.sample's from numpy's RandomState(seed), which is what the
    reference draws after np.random.seed(seed)."""
    import numpy as np
    import pandas as pd

    if rounds < 1:
        raise ConfigError(f"arena_hard bootstrap rounds must be at least 1, got {rounds}")
    generator = np.random.RandomState(seed)
    ratings, skipped = [], 0
    with _one_blas_thread():
        for _ in range(rounds):
            sample = battles.sample(frac=1.0, replace=True, random_state=generator)
            try:
                ratings.append(pd.Series(bradley_terry(sample, anchor=anchor)))
            except OneOutcome:  # the reference fails the run here (few battles, a lopsided model): skipped, counted
                skipped += 1
    return _rounds_table(ratings, skipped, rounds)


def _rounds_table(ratings: list, skipped: int, rounds: int) -> pd.DataFrame:
    """The bootstrap's ratings, a row per round that could be fit and the models by median rating, highest first;
    how many rounds were skipped (one outcome) in its attrs."""
    import pandas as pd

    if not ratings:
        raise OneOutcome(f"arena_hard: none of the {rounds} bootstrap resamples can be fit (one outcome each)")
    table = pd.DataFrame(ratings)
    table = table[table.median().sort_values(ascending=False).index]
    table.attrs["skipped_rounds"] = skipped
    return table


def _win_rate(rating: float, baseline_rating: float, model: str, baseline: str) -> float:
    """get_win_rate_column: the model's predicted win rate against the baseline, in % rounded to 2 decimals; 50 for
    the baseline itself and for a missing value (its fillna(0.5)). predict_win_rate fills its table for every
    ordered pair, and the later write wins: 1 - P(baseline wins) when the model's name sorts before the baseline's,
    else P(model wins); both are kept so the last digit matches."""
    if model == baseline:
        return 50.0
    if model < baseline:
        p = 1 - 1 / (1 + 10 ** ((rating - baseline_rating) / 400))
    else:
        p = 1 / (1 + 10 ** ((baseline_rating - rating) / 400))
    return 50.0 if math.isnan(p) else round(p * 100, 2)


def leaderboard(
    battles: pd.DataFrame, baseline: str = BASELINE, rounds: int = 100, seed: int | None = SEED
) -> list[dict]:
    """v0.1 show_result's table: per model the rating of all battles, the bootstrap's 2.5th and 97.5th percentile
    ratings, each turned into a win rate against the baseline (the baseline's own rating in that column as the
    opponent): `score`, `lower`, `upper` in % (2 decimals, the values of its csv); `interval` = (lower - score,
    upper - score) rounded to 1 decimal, as it prints it next to round(score, 1); `battles` = rows with the model
    (weighted). Sorted by score, highest first, as its pandas sort does (ties in name order). With style control:
    `style_leaderboard`."""
    if _one_outcome(battles):
        return _one_outcome_rows(battles, baseline)
    ratings = bradley_terry(battles, anchor=baseline)
    if baseline not in ratings:
        raise RecordError(f"arena_hard baseline {baseline!r} is in no battle; the battles hold {sorted(ratings)}")
    return _board(battles, baseline, ratings, bootstrap(battles, rounds=rounds, seed=seed, anchor=baseline))


def _one_outcome(battles: pd.DataFrame) -> bool:
    """Every battle won by the same side: no logistic fit exists (the reference stops on sklearn's error)."""
    winners = battles["winner"]
    return len(battles) > 0 and winners.nunique() == 1 and winners.iloc[0] in ("model_a", "model_b")


def _board(battles: pd.DataFrame, baseline: str, ratings: dict[str, float], rounds_table: pd.DataFrame) -> list[dict]:
    """show_result's stats from the ratings of all battles and the bootstrap's table (see `leaderboard`)."""
    import numpy as np
    import pandas as pd

    models = sorted(ratings)
    columns = {
        "rating": ratings,
        "lower": {m: float(np.percentile(rounds_table[m], 2.5)) for m in models},
        "upper": {m: float(np.percentile(rounds_table[m], 97.5)) for m in models},
    }
    counts = pd.concat([battles["model_a"], battles["model_b"]]).value_counts()
    rows = []
    for m in models:
        row = {"model": m}
        row |= {
            key: _win_rate(values[m], values[baseline], m, baseline)
            for key, values in (("score", columns["rating"]), ("lower", columns["lower"]), ("upper", columns["upper"]))
        }
        row["interval"] = (round(row["lower"] - row["score"], 1), round(row["upper"] - row["score"], 1))
        row |= {"rating": ratings[m], "rating_lower": columns["lower"][m], "rating_upper": columns["upper"][m]}
        row["battles"] = int(counts.get(m, 0))
        row["skipped_rounds"] = rounds_table.attrs.get("skipped_rounds", 0)
        rows.append(row)
    # The same pandas sort on the same (name-sorted) order as the reference, so ties come out as they do there.
    order = pd.DataFrame({"score": [r["score"] for r in rows]}).sort_values(by="score", ascending=False).index
    return [rows[i] for i in order]


def _one_outcome_rows(battles: pd.DataFrame, baseline: str) -> list[dict]:
    """Every battle won by the same side (where the reference cannot fit and stops): each model's score is that
    outcome, 100 or 0, with no interval and no rating; the baseline's 50."""
    import pandas as pd

    won = battles["winner"].iloc[0]
    counts = pd.concat([battles["model_a"], battles["model_b"]]).value_counts()
    rows = []
    for m in sorted(counts.index):
        score = 50.0 if m == baseline else (100.0 if (won == "model_b") == (m in set(battles["model_b"])) else 0.0)
        rows.append({"model": m, "score": score, "lower": score, "upper": score, "interval": (0.0, 0.0)})
        rows[-1] |= {"rating": None, "rating_lower": None, "rating_upper": None, "battles": int(counts[m])}
        rows[-1]["one_outcome"] = f"every battle won by {won}: no rating can be fit"
    return sorted(rows, key=lambda r: -r["score"])


def _control_features(control: str) -> tuple[str, ...]:
    if control not in STYLE_CONTROLS:
        raise ConfigError(f"arena_hard style control must be one of {sorted(STYLE_CONTROLS)}, got {control!r}")
    return STYLE_CONTROLS[control]


def style_matrices(battles: pd.DataFrame, control: str = "style") -> tuple[Any, Any, list[str]]:
    """construct_style_matrices as show_result calls it for `control`: the Bradley-Terry design of `bradley_terry`
    (battles written twice; +ln 10 for model_a's column, -ln 10 for model_b's; y = A won, a tie a win in the first
    copy only), plus one column per style feature: (a - b) / (a + b + 1) of model_a's (the baseline's) and model_b's
    values, standardised to mean 0 and (population) standard deviation 1 over all rows. Returns (x, y, models), the
    models in order of first appearance. A feature with one value on every row (standard deviation 0) is a column of
    zeros here, so its coefficient is 0; the reference divides by 0 and its fit fails on the NaN."""
    import numpy as np
    import pandas as pd

    names = _control_features(control)
    needed = [column for name in names for column in _STYLE_COLUMNS[name]]
    if missing := [column for column in needed if column not in battles.columns]:
        raise ConfigError(f"arena_hard style control needs battles made with features= (missing columns {missing})")
    if len(battles) == 0:
        raise RecordError("arena_hard has no battles to rate (every verdict unparsable, or no judgments)")
    models = pd.unique(pd.concat([battles["model_a"], battles["model_b"]]).to_numpy())
    column = {m: j for j, m in enumerate(models)}
    n, p, k = len(battles), len(models), len(names)
    rows = np.arange(2 * n)
    x = np.zeros((2 * n, p + k))
    x[rows, np.tile(battles["model_a"].map(column).to_numpy(), 2)] = +math.log(10)
    x[rows, np.tile(battles["model_b"].map(column).to_numpy(), 2)] = -math.log(10)
    # (features, rows) over both copies, the reference's layout, so its means and deviations round the same way
    a = np.tile(np.array([battles[_STYLE_COLUMNS[name][0]] for name in names], dtype=float), 2)
    b = np.tile(np.array([battles[_STYLE_COLUMNS[name][1]] for name in names], dtype=float), 2)
    ratio = (a - b) / (a + b + 1)
    mean, std = np.mean(ratio, axis=1), np.std(ratio, axis=1)
    centred = ratio - mean[:, np.newaxis]
    x[:, p:] = np.divide(centred, std[:, np.newaxis], out=np.zeros_like(centred), where=std[:, np.newaxis] > 0).T
    winner = battles["winner"].to_numpy()
    a_won = winner == "model_a"
    tie = (winner == "tie") | (winner == "tie (bothbad)")
    y = np.concatenate([a_won | tie, a_won]).astype(float)
    return x, y, [str(m) for m in models]


def _style_fit(x: Any, y: Any, models: list[str], anchor: str) -> tuple[dict[str, float], Any]:
    """fit_bt: sklearn's LogisticRegression(fit_intercept=False) with its defaults, which the reference keeps: an L2
    penalty with C=1 (unlike compute_mle_elo's unpenalised fit), lbfgs, tol=1e-4, max_iter=100. Ratings are
    400 * coefficient + 1000, moved so that the anchor has STYLE_ANCHOR_RATING; only models with a battle in x are
    rated. Returns (ratings highest first, the style coefficients)."""
    import numpy as np
    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    if y.min() == y.max():
        raise OneOutcome("arena_hard battles all have one outcome; no rating can be fit")
    p = len(models)
    present = x[:, :p].any(axis=0)
    if anchor not in models or not present[models.index(anchor)]:
        raise _NoAnchor(f"arena_hard baseline {anchor!r} is in no battle; the battles hold {models}")
    coef = LogisticRegression(fit_intercept=False).fit(x, y).coef_[0]
    ratings = 400 * coef[:p] + 1000
    ratings += STYLE_ANCHOR_RATING - ratings[models.index(anchor)]
    ranked = pd.Series(ratings[present], index=np.array(models, dtype=object)[present]).sort_values(ascending=False)
    return {str(m): float(r) for m, r in ranked.items()}, coef[p:]


class _NoAnchor(RecordError):
    """The baseline has no battle, so the ratings cannot be anchored."""


def style_bradley_terry(
    battles: pd.DataFrame, control: str = "style", anchor: str = BASELINE
) -> tuple[dict[str, float], dict[str, float]]:
    """fit_bt on construct_style_matrices: the style-controlled ratings (the anchor at 1114, highest first) and the
    style coefficients under the names show_result prints (sum_assistant_a_tokens, header_count_a, list_count_a,
    bold_count_a: model_a's column names). A positive coefficient: the answer with more of the feature, relative to
    the two answers' total, tends to win."""
    x, y, models = style_matrices(battles, control)
    ratings, coef = _style_fit(x, y, models, anchor)
    return ratings, _coefficients(control, coef)


def _coefficients(control: str, coef: Any) -> dict[str, float]:
    return {_STYLE_COLUMNS[name][0]: float(c) for name, c in zip(_control_features(control), coef)}


def _style_rounds(x: Any, y: Any, models: list[str], rounds: int, seed: int | None, anchor: str) -> pd.DataFrame:
    """get_bootstrap_result_style_control: each round draws as many battles as there are, with replacement, by their
    index into the first copy (numpy's choice from RandomState(seed), which draws what np.random.choice draws after
    np.random.seed(seed)); a drawn tie brings its rows from both copies, another battle its first-copy row twice,
    in the reference's row order (others, others again, ties, ties' second copies); the matrices, standardisation
    included, are not rebuilt. One row of ratings per round, models by median, highest first.

    Departures: a round with one outcome or without the baseline is skipped and counted (attrs["skipped_rounds"]),
    where the reference stops; a model with no battle in a round gets NaN there, where the reference (which drops
    such models' names but not their columns) gives the later models' ratings under shifted names."""
    import numpy as np
    import pandas as pd

    if rounds < 1:
        raise ConfigError(f"arena_hard bootstrap rounds must be at least 1, got {rounds}")
    n = len(y) // 2
    tie = (y[:n] == 1) & (y[n:] == 0)  # a tie is a win in the first copy and a loss in the second
    generator = np.random.RandomState(seed)
    ratings, skipped = [], 0
    with _one_blas_thread():
        for _ in range(rounds):
            drawn = generator.choice(n, size=n, replace=True)
            others, ties = drawn[~tie[drawn]], drawn[tie[drawn]]
            order = np.concatenate([others, others, ties, ties + n])
            try:
                ratings.append(pd.Series(_style_fit(x[order], y[order], models, anchor)[0]))
            except (OneOutcome, _NoAnchor):
                skipped += 1
    return _rounds_table(ratings, skipped, rounds)


def style_bootstrap(
    battles: pd.DataFrame, control: str = "style", rounds: int = 100, seed: int | None = SEED, anchor: str = BASELINE
) -> pd.DataFrame:
    """get_bootstrap_result_style_control on construct_style_matrices (see `_style_rounds`): one row of
    style-controlled ratings per round, models by median rating, highest first."""
    x, y, models = style_matrices(battles, control)
    return _style_rounds(x, y, models, rounds, seed, anchor)


def style_leaderboard(
    battles: pd.DataFrame,
    baseline: str = BASELINE,
    control: str = "style",
    rounds: int = 100,
    seed: int | None = SEED,
) -> dict:
    """show_result.py with --style-control (control="style"), --length-control-only ("length") or
    --markdown-control-only ("markdown"), on battles made with `battles(..., features=...)`:
    {"control": control, "rows": the rows of `leaderboard` computed from the style-controlled fit and its bootstrap
    (score, lower, upper, interval as it prints and saves them; rating, rating_lower, rating_upper with the baseline
    at 1114), "coefficients": the style coefficients by show_result's names, "displayed": those rounded to 3 decimals
    as it prints them ("Style Coefficients: {...}")}.

    As in `leaderboard`, battles all won by one side give 0 / 100 with no rating and no coefficients (None), and
    bootstrap rounds that cannot be fit are skipped and counted in each row's skipped_rounds."""
    _control_features(control)
    if _one_outcome(battles):
        rows = _one_outcome_rows(battles, baseline)
        return {"control": control, "rows": rows, "coefficients": None, "displayed": None}
    x, y, models = style_matrices(battles, control)
    ratings, coef = _style_fit(x, y, models, baseline)
    rows = _board(battles, baseline, ratings, _style_rounds(x, y, models, rounds, seed, baseline))
    coefficients = _coefficients(control, coef)
    displayed = {name: round(value, 3) for name, value in coefficients.items()}
    return {"control": control, "rows": rows, "coefficients": coefficients, "displayed": displayed}


def average_tokens(features: Mapping[str, Mapping[Any, Mapping[str, Any]]]) -> dict[str, int]:
    """show_result's "average #tokens" per model: int(the mean token_len over the model's answers). Pass the
    features of every answer in the model's answer file, judged or not, as the reference reads them all."""
    averages = {}
    for model, answers in features.items():
        lengths = [_feature_value(meta, "token_len", f"of {model!r} on question {q!r}") for q, meta in answers.items()]
        averages[model] = int(sum(lengths) / len(lengths)) if lengths else 0
    return averages


def score_battles(judgments: list[dict], weight: int = 3) -> pd.DataFrame:
    """HEAD show_result's load_judgments: a judgment with a missing game or verdict is dropped whole; otherwise
    game 2's (model as A) scores, then 1 - each of game 1's (baseline as A), one row each: 1 = the model won, 0.5 =
    tie, a strong verdict `weight` rows. Columns question_id, model, score."""
    import pandas as pd

    rows = []
    for i, record in enumerate(judgments):
        games = [_verdict(g) for g in _games(record, i, 2)[:2]]
        if games[0] is None or games[1] is None:
            continue
        question_id = record.get("uid", record.get("question_id"))
        for label, model_is_a in ((games[1], True), (games[0], False)):
            if not isinstance(label, str) or label not in _HEAD_SCORES:
                raise RecordError(
                    f"arena_hard judgment {i} (model {record['model']!r}): verdict {label!r} is none of "
                    f"{sorted(_HEAD_SCORES)} (HEAD show_result fails on it too)"
                )
            score, strong = _HEAD_SCORES[label]
            row = {
                "question_id": question_id,
                "model": record["model"],
                "score": float(score if model_is_a else 1 - score),
            }
            rows += [row] * (weight if strong else 1)
    return pd.DataFrame(rows, columns=["question_id", "model", "score"])


def score_leaderboard(
    judgments: list[dict], baseline: str, weight: int = 3, rounds: int = 100, seed: int | None = SEED
) -> list[dict]:
    """HEAD show_result's print_leaderboard (no style control): per model, each round resamples its own rows with
    replacement (groupby.sample, models in name order) and takes the mean; `score` = the mean of the round means,
    `lower` / `upper` = their 5th / 95th percentiles, all in % unrounded; `rounded` = round(score, 1) and
    `interval` = (-round(score - lower, 1), round(upper - score, 1)), printed there as "(-a / +b)" (a 90% interval).
    The baseline is added at 50 with (0.0, 0.0). Sorted by the rounded score, highest first. HEAD draws from the
    unseeded global generator; we draw from RandomState(seed), which gives its numbers after np.random.seed(seed)."""
    import numpy as np
    import pandas as pd

    table = score_battles(judgments, weight=weight)
    if table.empty:
        raise RecordError("arena_hard has no scored judgments (every game unparsable, or no judgments)")
    generator = np.random.RandomState(seed)
    means = pd.DataFrame(
        [
            table.groupby("model")
            .sample(frac=1.0, replace=True, random_state=generator)
            .groupby("model")["score"]
            .mean()
            for _ in range(rounds)
        ]
    )
    rows = []
    for m in means.columns:
        # Python floats, as HEAD's map/apply hand them to round() (numpy's round differs in the last digit at times)
        score, lower, upper = (float(v) for v in (means[m].mean(), means[m].quantile(0.05), means[m].quantile(0.95)))
        rows.append(
            {
                "model": str(m),
                "score": score * 100,
                "lower": lower * 100,
                "upper": upper * 100,
                "rounded": round(score * 100, 1),
                "interval": (-round((score - lower) * 100, 1), round((upper - score) * 100, 1)),
                "battles": int((table["model"] == m).sum()),
            }
        )
    base = {"model": baseline, "score": 50.0, "lower": 50.0, "upper": 50.0, "rounded": 50.0, "interval": (0.0, 0.0)}
    rows.append(base | {"battles": len(table)})
    order = pd.DataFrame({"s": [r["rounded"] for r in rows]}).sort_values(by="s", ascending=False).index
    return [rows[i] for i in order]
