"""AlpacaEval 2's computations, reproduced from alpaca-eval 0.6.6: the judge's messages, the order swap, the reading of
the judge's reply, the win rate and the length-controlled win rate.

AlpacaEval 2 compares a model's outputs with a baseline's (GPT-4 Turbo's) on its 805 instructions. Its default
annotator, `weighted_alpaca_eval_gpt4_turbo`, asks the judge (prompt `alpaca_eval_clf.txt`, one token, top-5
logprobs) which of two outputs is better, naming the first shown "m" and the second "M"; the preference is then
2 - P(m | m or M) (1: the first shown is better, 2: the second), not rounded to 1 or 2. Which of baseline and model is
shown first is decided per instruction by a seeded coin flip, undone afterwards. The leaderboard's number is the
length-controlled win rate: a logistic regression (a GLM) of the preferences on the length difference, the instruction's
difficulty and the model's identity, whose prediction with the length difference set to zero is averaged.

Each function here is alpaca-eval's own computation, written again (none of its code is copied) and tested against the
installed package (tests/test_alpaca_eval.py): prompts byte for byte, the coin flips, the parser, and the metrics to
1e-9. We reproduce instead of importing because alpaca_eval cannot be used the way our runs need: `import alpaca_eval`
imports `pkg_resources` (gone from recent setuptools) and loads a `.env` file, and its length-controlled win rate
downloads `df_gamed.csv` from the Hugging Face Hub inside the function, so a pinned, offline copy of that file could
not be used through it. Here the caller reads the file and passes it in.

Where alpaca-eval's behaviour is surprising, it is reproduced and said so: a preference of 0 is an old encoding of a
draw and counts as 1.5; unparsable judgements (NaN) leave the win rate but still count in the length-controlled win
rate's average; an instruction's difficulty is looked up by row position in `df_gamed.csv`, not by its `index` column.
alpaca-eval also never asks the judge when the two outputs are identical: it records 1.5 (the runner's job).
"""

from __future__ import annotations

import logging
import math
import random
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from gpt4llm.errors import ConfigError, RecordError

if TYPE_CHECKING:
    import pandas

log = logging.getLogger(__name__)

# The judge's names for the first and second output shown (alpaca_eval_clf.txt), and logprob_parser's settings in
# evaluators_configs/weighted_alpaca_eval_gpt4_turbo/configs.yaml: numerator "m" over denominators {"m", "M"}.
FIRST_TOKEN = "m"
SECOND_TOKEN = "M"

# The pairwise annotator's default seed (PairwiseAnnotator(seed=0), handed to its single annotator and on to the
# processor that swaps the outputs), and the name of that processor's column, which starts its seed string.
ANNOTATOR_SEED = 0
_SWITCH_COLUMN = "is_switched_outputs"

# What make_prompts takes for a placeholder: `{name}` with no whitespace in the name.
_PLACEHOLDER = re.compile(r"{([^ \s]+?)}")
_IM_START, _IM_END = "<|im_start|>", "<|im_end|>"

# glm_winrate.GLM_INFO["length_controlled_v1"]: the gamed baselines' rows weigh lambda/2 each (there are two of them),
# so the model's own fit is pulled towards theirs; five cross-validation folds choose the L1 penalty.
LC_REGULARIZE_TO_BASELINE_LAMBDA = 0.2
LC_N_SPLITS = 5
LC_RANDOM_STATE = 123


def judge_messages(template: str, instruction: str, output_1: str, output_2: str) -> list[dict[str, str]]:
    """The chat messages alpaca-eval sends the judge for one example (batch size 1), byte for byte.

    `template` is the annotator's prompt file (e.g. alpaca_eval_clf.txt), written in alpaca-eval's ChatML-like format;
    output_1 is shown first ("m"), output_2 second ("M"): swap them first where `is_switched` says so.

    Filling is alpaca-eval's `make_prompts`: each placeholder, in the order of its first appearance in the template,
    replaces the first `{name}` left in the prompt. So a `{output_1}` written inside the instruction is filled in
    place of the template's own, as alpaca-eval does. The messages are its `prompt_to_chatml`, with the openai
    decoder's strip first: one message per `<|im_start|>role` block, its content stripped and cut at `<|im_end|>`.
    """
    fields = {"instruction": instruction, "output_1": output_1, "output_2": output_2}
    counts = Counter(_PLACEHOLDER.findall(template))
    unknown = sorted(set(counts) - set(fields))
    if unknown:
        raise ConfigError(f"The judge's template has placeholders {unknown}; only {sorted(fields)} can be filled.")
    repeated = sorted(name for name, n in counts.items() if n != 1)
    if repeated:
        # make_prompts with batch_size 1 refuses a template whose placeholders are not there exactly once
        raise ConfigError(f"The judge's template must hold each placeholder once; {repeated} are there more often.")

    prompt = template
    for name in counts:  # a Counter keeps the order of first appearance, which is make_prompts' order
        prompt = prompt.replace("{" + name + "}", str(fields[name]), 1)
    return _chatml_messages(prompt.strip())


def _chatml_messages(prompt: str) -> list[dict[str, str]]:
    """alpaca-eval's prompt_to_chatml: `<|im_start|>role\\ncontent<|im_end|>` blocks to OpenAI chat messages. A role
    "system name=x" becomes role "system" with the extra field name="x", as in the OpenAI cookbook's ChatML."""
    prompt = prompt.strip()
    if not (prompt.startswith(_IM_START) and prompt.endswith(_IM_END)):
        raise ConfigError(f"The judge's prompt must start with {_IM_START} and end with {_IM_END}.")
    messages = []
    for block in prompt.split(_IM_START)[1:]:
        if "\n" not in block:
            # alpaca-eval fails here too (IndexError): a block with a role and no content line
            raise RecordError(f"A chat block of the judge's prompt has no newline after its role: {block[:80]!r}.")
        header, body = block.split("\n", 1)
        role = header.strip()
        message = {"content": body.split(_IM_END, 1)[0].strip(), "role": role}
        if role.startswith("system") and role != "system":
            message["role"] = "system"
            for pair in role.split("system", 1)[-1].split(" "):
                if pair:
                    key, value = pair.split("=", 1)
                    message[key] = value
        messages.append(message)
    return messages


def is_switched(instruction: str, seed: int = ANNOTATOR_SEED) -> bool:
    """Whether alpaca-eval shows the model's output first (as "m") and the baseline's second for this instruction.

    Its RandomSwitchTwoColumnsProcessor draws `random.Random(seed_string).choices([False, True])` with the seed string
    "is_switched_outputs" + instruction + str(seed): the same instruction gets the same order for every model, and
    `seed` is the annotator's (0 for AlpacaEval 2's default annotator).
    """
    return random.Random(f"{_SWITCH_COLUMN}{instruction}{seed}").choices([False, True], k=1)[0]


def preference_from_logprobs(top_logprobs: Sequence[dict[str, Any]]) -> float:
    """The weighted preference in [1, 2] from the judge's first token: 2 - P(m) / (P(m) + P(M)), so 1 when the
    first shown output is surely better, 2 when the second is (logprob_parser, not binarized).

    `top_logprobs` is OpenAI's `choices[0].logprobs.content[0].top_logprobs`. Tokens match exactly (" m" is not
    "m"); a token missing from the top 5 has probability 0; NaN when neither is there (unparsable). As in
    alpaca-eval, the last entry wins if a token is listed twice.
    """
    found = {t["token"]: t["logprob"] for t in top_logprobs if t["token"] in (FIRST_TOKEN, SECOND_TOKEN)}
    if not found:
        return math.nan
    if SECOND_TOKEN not in found:
        return 1.0
    if FIRST_TOKEN not in found:
        return 2.0
    # P(m) / (P(m) + P(M)) = sigmoid(logprob_m - logprob_M), computed without overflowing exp
    diff = found[FIRST_TOKEN] - found[SECOND_TOKEN]
    p_first = 1.0 / (1.0 + math.exp(-diff)) if diff >= 0 else math.exp(diff) / (1.0 + math.exp(diff))
    return 2.0 - p_first


def preference_from_text(text: str) -> float | None:
    """The binarized reading of a judge's reply, for judges that return no logprobs (a local model, say): "m" (the
    first shown output is better) is 1.0, "M" is 2.0, after stripping whitespace; anything else is None (unparsable).

    This is not the official annotator's reading: `weighted_alpaca_eval_gpt4_turbo` weighs by the two tokens'
    probabilities (`preference_from_logprobs`), so win rates from replies read this way are those of a binarized
    annotator and differ from AlpacaEval 2's published ones.
    """
    return {FIRST_TOKEN: 1.0, SECOND_TOKEN: 2.0}.get(text.strip())


def unswitch(preference: float, switched: bool) -> float:
    """The preference relative to (baseline = 1, model = 2) once the swap is undone: 3 - preference where the outputs
    were shown swapped, as alpaca-eval's postprocessing does. NaN (unparsable) stays NaN."""
    if math.isnan(preference):
        return preference
    if not 1 <= preference <= 2:
        # alpaca-eval asserts every annotation is in [1, 2] after undoing the swap
        raise RecordError(f"A judge's preference must be in [1, 2] or NaN, got {preference}.")
    return 3 - preference if switched else preference


def win_rate(preferences: Sequence[float | None]) -> dict[str, float | int]:
    """alpaca-eval's get_winrate: the mean preference for the model, in percent, and its counts.

    A preference is in [1, 2] (2: the model's output is better); 0 and 1.5 are draws (0 is an old encoding of a draw
    that alpaca-eval still reads as 1.5); NaN, None or anything outside [1, 2] is left out of every number except
    n_draws. Keys: win_rate (mean of preference - 1, x 100), standard_error (its standard error, x 100), n_wins
    (above 1.5), n_wins_base (below 1.5), n_draws, n_total (preferences counted), and discrete_win_rate (the same
    with each preference rounded to 1, 1.5 or 2 first, halves to even as numpy does).
    """
    values = np.array([math.nan if p is None else float(p) for p in preferences], dtype=float)
    draws_as_half = np.where(values == 0, 1.5, values)
    n_draws = int((draws_as_half == 1.5).sum())
    counted = _preferences_in_range(draws_as_half) - 1
    mean, sem = _mean_and_sem(counted)

    # ZeroOneScoringRule: 1.5 becomes 0 before rounding so that draws stay draws, then 0 is read as 1.5 again
    rounded = np.round(np.where(values == 1.5, 0.0, values))
    discrete = _preferences_in_range(np.where(rounded == 0, 1.5, rounded)) - 1
    return {
        "win_rate": mean * 100,
        "standard_error": sem * 100,
        "n_wins": int((counted > 0.5).sum()),
        "n_wins_base": int((counted < 0.5).sum()),
        "n_draws": n_draws,
        "n_total": len(counted),
        "discrete_win_rate": _mean_and_sem(discrete)[0] * 100,
    }


def length_controlled_winrate(annotations: Sequence[dict[str, Any]], gamed: pandas.DataFrame) -> dict[str, Any]:
    """alpaca-eval's get_length_controlled_winrate (glm length_controlled_v1, no weights saved, baseline None):
    everything `win_rate` returns, plus length_controlled_winrate and lc_standard_error (both in percent).

    Each annotation has index (the instruction's position in the AlpacaEval set, 0-804), output_1 (the baseline's),
    output_2 (the model's), preference (after `unswitch`; NaN or None if unparsable), generator_1 and generator_2 (one
    model). `gamed` is df_gamed.csv from the tatsu-lab/alpaca_eval dataset as `pandas.read_csv` reads it: the
    preferences of two length-gamed versions of the baseline, which regularize the fit, and each instruction's
    difficulty. Pass every annotation, unparsable ones included: alpaca-eval leaves them out of the fit but averages
    the prediction over them too.

    The GLM predicts P(model better) from tanh(standardized length difference), the instruction's difficulty and an
    indicator of not being a gamed baseline; L1-regularized logistic regression (liblinear) with the penalty chosen by
    5-fold cross-validation on a log loss with soft labels. Its prediction with no length difference, averaged over
    the instructions, is the length-controlled win rate. When the model is the baseline it is 50 by construction.
    Needs scikit-learn (and pandas), imported here as alpaca-eval's metrics do.
    """
    if not annotations:
        raise RecordError("No annotations to compute the AlpacaEval win rate from.")
    for key in ("index", "output_1", "output_2", "preference", "generator_1", "generator_2"):
        missing = [i for i, a in enumerate(annotations) if key not in a]
        if missing:
            raise RecordError(f"AlpacaEval annotation {missing[0]} has no {key!r}.")
    models = {a["generator_2"] for a in annotations}
    if len(models) != 1:
        raise RecordError(f"AlpacaEval annotations must be of one model (generator_2), got {sorted(map(str, models))}.")

    metrics: dict[str, Any] = win_rate([a["preference"] for a in annotations])
    preference = np.array([math.nan if a["preference"] is None else float(a["preference"]) for a in annotations])
    # alpaca-eval takes the baseline's name from the first annotation, and does not check that there is only one
    if annotations[0]["generator_1"] == next(iter(models)):
        # the model against itself: every prediction is 0.5, except where the preference is missing (NaN * 0 + 0.5)
        predicted = np.where(np.isnan(preference), math.nan, 0.5)
    else:
        predicted = _predict_without_length_difference(annotations, preference, gamed)

    metrics["length_controlled_winrate"], metrics["lc_standard_error"] = (x * 100 for x in _mean_and_sem(predicted))
    if _is_extreme_change(metrics["win_rate"], metrics["length_controlled_winrate"]):
        log.warning(
            "The length-controlled win rate is very different from the raw one: %.1f%% vs %.1f%%; the GLM may have "
            "failed (alpaca-eval gives the same warning).",
            metrics["length_controlled_winrate"],
            metrics["win_rate"],
        )
    return metrics


def _predict_without_length_difference(
    annotations: Sequence[dict[str, Any]], preference: np.ndarray, gamed: pandas.DataFrame
) -> np.ndarray:
    """glm_winrate's _get_featurized_data, fit_LogisticRegressionCV and predict_proba: P(model better) for each
    annotation had its output been as long as the baseline's."""
    import pandas as pd

    for column in ("preference", "index", "instruction_difficulty", "not_gamed_baseline", "std_delta_len"):
        if column not in gamed.columns:
            raise RecordError(f"df_gamed.csv has no {column!r} column; is it the tatsu-lab/alpaca_eval file?")
    gamed = gamed.reset_index(drop=True)  # row labels as pandas.read_csv numbers them (the lookup below uses them)
    if gamed["not_gamed_baseline"].dtype != bool:
        raise RecordError("df_gamed.csv's not_gamed_baseline column must be True/False.")

    # Difficulty: alpaca-eval keeps the first row of each index and then looks instructions up by that row's *label*
    # (its position in the file), not by the index column. The same when the file lists instruction i first at row
    # i; we do as it does either way.
    difficulty_by_row = gamed.drop_duplicates("index")["instruction_difficulty"]
    positions = [a["index"] for a in annotations]
    unknown = [p for p in positions if isinstance(p, bool) or not isinstance(p, (int, np.integer))]
    unknown += [p for p in positions if p not in difficulty_by_row.index]
    if unknown:
        raise RecordError(f"AlpacaEval annotations have indexes with no instruction difficulty: {unknown[:5]}.")
    difficulty = difficulty_by_row.loc[positions].to_numpy(dtype=float)

    outputs = [(a["output_1"], a["output_2"]) for a in annotations]
    if not all(isinstance(o1, str) and isinstance(o2, str) for o1, o2 in outputs):
        raise RecordError("AlpacaEval annotations' output_1 and output_2 must be strings.")
    # baseline minus model, in characters, divided by its standard deviation (pandas', as alpaca-eval's: ddof 1)
    delta = pd.Series([len(o1) - len(o2) for o1, o2 in outputs])
    std_delta_len = (delta / delta.std()).to_numpy(dtype=float)
    target = np.where(preference == 0, 1.5, preference) - 1  # P(model better), in [0, 1]

    # Design matrix of the formula "np.tanh(std_delta_len) + instruction_difficulty + not_gamed_baseline - 1" (no
    # intercept), built directly: patsy would give these columns in this order. The gamed baselines' rows come first,
    # weighing lambda / 2 each; the model's rows weigh 1.
    not_gamed = gamed["not_gamed_baseline"].to_numpy()
    features = np.concatenate(
        [
            np.column_stack(
                [
                    np.tanh(gamed["std_delta_len"].to_numpy(dtype=float)),
                    gamed["instruction_difficulty"].to_numpy(dtype=float),
                    not_gamed.astype(float),
                ]
            ),
            np.column_stack([np.tanh(std_delta_len), difficulty, np.ones(len(annotations))]),
        ]
    )
    labels = np.concatenate([gamed["preference"].to_numpy(dtype=float), target])
    weights = np.concatenate(
        [np.where(not_gamed, 1.0, LC_REGULARIZE_TO_BASELINE_LAMBDA / 2), np.ones(len(annotations))]
    )
    if not np.isfinite(features).all():
        # patsy would silently drop such rows and alpaca-eval then misaligns its labels: refuse instead
        raise RecordError(
            "AlpacaEval's length-controlled win rate needs finite features: df_gamed.csv has missing values, or "
            "every output pair differs in length by the same amount (no standard deviation)."
        )
    fitted = ~np.isnan(labels)  # unparsable judgements are not fitted (they are still predicted)
    model = _fit_soft_label_glm(features[fitted], labels[fitted], weights[fitted])

    # the test design: the same instruction, no length difference, the model (not a gamed baseline)
    no_length_difference = np.column_stack([np.zeros(len(annotations)), difficulty, np.ones(len(annotations))])
    return model.predict_proba(no_length_difference)[:, 1]


def _fit_soft_label_glm(features: np.ndarray, labels: np.ndarray, weights: np.ndarray):
    """glm_winrate.fit_LogisticRegressionCV with is_ytrue_proba=True: logistic regression on labels in [0, 1].

    scikit-learn's classifiers want hard labels, so each row is written twice, as label 1 weighing p and label 0
    weighing 1 - p (times its own weight), which is the same log loss. Both copies share a group, so a fold never
    splits them; the folds' score is the soft-label log loss on the original rows.
    """
    from sklearn import config_context
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import make_scorer
    from sklearn.model_selection import GroupKFold

    n = len(labels)
    label_prob = np.concatenate([labels, 1 - labels])  # the probability of each copy's hard label
    row_weight = np.concatenate([weights, weights])
    # alpaca-eval turns metadata routing on for the whole process; a context is enough to route the scorer's data
    with config_context(enable_metadata_routing=True), warnings.catch_warnings():
        # alpaca-eval's arguments (penalty="l1"), deprecated since scikit-learn 1.8: kept so the fit is alpaca-eval's
        warnings.simplefilter("ignore", FutureWarning)
        scorer = make_scorer(_soft_label_log_loss, response_method="predict_proba", greater_is_better=False)
        scorer = scorer.set_score_request(label_prob=True, row_weight=True)
        model = LogisticRegressionCV(
            cv=GroupKFold(n_splits=LC_N_SPLITS),
            scoring=scorer,
            random_state=LC_RANDOM_STATE,
            dual=False,
            penalty="l1",
            solver="liblinear",
            n_jobs=None,
            fit_intercept=False,
        )
        model.set_fit_request(sample_weight=True)
        model.fit(
            np.concatenate([features, features]),
            np.concatenate([np.ones(n, dtype=int), np.zeros(n, dtype=int)]),
            sample_weight=label_prob * row_weight,
            groups=np.concatenate([np.arange(n), np.arange(n)]),
            label_prob=label_prob,
            row_weight=row_weight,
        )
    return model


def _soft_label_log_loss(hard_label, predicted, label_prob, row_weight) -> float:
    """glm_winrate.logloss_continuous: the weighted log loss of P(label 1) against each row's soft label, recovered
    from the duplicated rows (a label-0 copy holds 1 - p). The arithmetic is alpaca-eval's, in its order, so the
    cross-validation picks the same penalty."""
    soft_label = np.where(hard_label == 1, label_prob, 1 - label_prob)
    epsilon = 1e-15
    predicted = np.clip(predicted, epsilon, 1 - epsilon)
    losses = soft_label * np.log(predicted) + (1 - soft_label) * np.log(1 - predicted)
    return -np.mean(losses * row_weight)


def _preferences_in_range(values: np.ndarray) -> np.ndarray:
    """The preferences alpaca-eval counts: those in [1, 2] (NaN is not)."""
    return values[(values >= 1) & (values <= 2)]


def _mean_and_sem(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard error (ddof 1) over the non-NaN values, NaN where there are too few (as pandas gives)."""
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return math.nan, math.nan
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan
    return mean, float(values.std(ddof=1) / math.sqrt(len(values)))


def _is_extreme_change(previous: float, new: float, abs_diff: float = 10, rel_diff: float = 4) -> bool:
    """glm_winrate.get_is_extreme_changes: whether the length-controlled win rate moved by more than the larger of
    abs_diff points and a rel_diff-th of the room left (towards 0 or towards 100)."""
    too_small = new < min(previous - previous / rel_diff, previous - abs_diff)
    too_large = new > max(previous + (100 - previous) / rel_diff, previous + abs_diff)
    return bool(too_small or too_large)
