"""gpt4llm.evaluation.alpaca_eval against the installed alpaca-eval package itself: the metrics to 1e-9, the judge's
messages byte for byte, the order swaps, the logprob parser, and the whole annotation of a head-to-head with a fake
judge. No network: alpaca-eval's download of df_gamed.csv is replaced by a synthetic file with the real one's columns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gpt4llm.errors import ConfigError, RecordError
from gpt4llm.evaluation.alpaca_eval import (
    is_switched,
    judge_messages,
    length_controlled_winrate,
    preference_from_logprobs,
    preference_from_text,
    unswitch,
    win_rate,
)

DEFAULT_ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"  # AlpacaEval 2's
N_INSTRUCTIONS = 805


@pytest.fixture(scope="module")
def ae():
    """The alpaca_eval package. Its utils import pkg_resources (only for version checks), which recent setuptools no
    longer has: a stub stands in while it is imported. Its import sets the root logger to INFO and its
    length-controlled win rate turns on scikit-learn's metadata routing for the process: both are put back."""
    root_level = logging.getLogger().level
    stubbed = False
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        sys.modules["pkg_resources"] = types.ModuleType("pkg_resources")
        stubbed = True
    try:
        package = pytest.importorskip("alpaca_eval")
        import alpaca_eval.annotators.base
        import alpaca_eval.completion_parsers
        import alpaca_eval.metrics.glm_winrate
        import alpaca_eval.processors
        import alpaca_eval.utils  # noqa: F401
    finally:
        if stubbed:
            sys.modules.pop("pkg_resources", None)
        logging.getLogger().setLevel(root_level)

    import sklearn

    routing = sklearn.get_config()["enable_metadata_routing"]
    yield package
    sklearn.set_config(enable_metadata_routing=routing)


@pytest.fixture(scope="module")
def annotator_config(ae) -> dict:
    """AlpacaEval 2's default annotator's settings, as the package ships them."""
    return ae.utils.load_configs(ae.constants.EVALUATORS_CONFIG_DIR / DEFAULT_ANNOTATOR)[DEFAULT_ANNOTATOR]


@pytest.fixture(scope="module")
def template(ae, annotator_config) -> str:
    return (ae.constants.EVALUATORS_CONFIG_DIR / annotator_config["prompt_template"]).read_text()


# ----------------------------------------------------------------------------------------------------------------
# synthetic data: df_gamed.csv's shape, and annotations whose preferences depend on length and difficulty, so that the
# GLM's coefficients are not all shrunk to 0 (a fit that predicts 0.5 everywhere would compare nothing)


def _gamed_frame(rng: np.random.Generator, shuffle_first_block: bool = False) -> pd.DataFrame:
    """Two gamed baselines (a concise and a verbose one) on every instruction, as df_gamed.csv has. With
    shuffle_first_block, the first baseline's rows are not in index order, so a row's position differs from its index
    (alpaca-eval looks difficulties up by position; this catches a lookup by the index column)."""
    difficulty = rng.normal(0.0, 1.0, N_INSTRUCTIONS)
    blocks = []
    for k, (model, sign) in enumerate((("gpt4_gamed_concise", 1.0), ("gpt4_gamed_verbose", -1.0))):
        order = rng.permutation(N_INSTRUCTIONS) if (shuffle_first_block and k == 0) else np.arange(N_INSTRUCTIONS)
        std_delta_len = sign * np.abs(rng.normal(1.0, 0.6, N_INSTRUCTIONS))
        logit = -1.3 * np.tanh(std_delta_len) - 0.6 * difficulty[order] + rng.normal(0.0, 0.7, N_INSTRUCTIONS)
        blocks.append(
            pd.DataFrame(
                {
                    "model": model,
                    "preference": 1 / (1 + np.exp(-logit)),
                    "index": order,
                    "instruction_difficulty": difficulty[order],
                    "not_gamed_baseline": False,
                    "std_delta_len": std_delta_len,
                }
            )
        )
    return pd.concat(blocks, ignore_index=True)


def _text(rng: np.random.Generator, length: int) -> str:
    """A text of `length` characters, some of them outside ASCII (lengths are counted in characters)."""
    return "".join(rng.choice(list("abcdef ghij\n{}\"'é日🙂"), size=length))


def _annotations(rng: np.random.Generator, model_longer: bool, n: int = 120, model: str = "our-model") -> list[dict]:
    indexes = rng.choice(N_INSTRUCTIONS, size=n, replace=False)
    base_len = rng.integers(100, 1500, size=n)
    ratio = rng.uniform(1.0, 2.5, size=n) if model_longer else rng.uniform(0.3, 1.0, size=n)
    model_len = np.maximum(1, (base_len * ratio).astype(int))
    delta = (base_len - model_len) / np.std(base_len - model_len)
    # the judge likes the longer output, and the model is a little better on its own
    logit = -1.5 * np.tanh(delta) + 0.3 + rng.normal(0.0, 0.8, size=n)
    preference = 1 + 1 / (1 + np.exp(-logit))
    preference[:12] = [1.5, 1.5, 0, 0, 1.0, 1.0, 2.0, 2.0, np.nan, np.nan, 1.5, 0]  # draws (0: the old code), NaN
    annotations = [
        {
            "index": int(indexes[i]),
            "output_1": _text(rng, int(base_len[i])),
            "output_2": _text(rng, int(model_len[i])),
            "preference": float(preference[i]),
            "generator_1": "gpt4_1106_preview",
            "generator_2": model,
        }
        for i in range(n)
    ]
    annotations[9]["preference"] = None  # unparsable, as alpaca-eval's annotator leaves it
    return annotations


def _assert_same_metrics(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs)
    for key, expected in theirs.items():
        got = ours[key]
        if isinstance(expected, float) and math.isnan(expected):
            assert math.isnan(got), key
        else:
            assert got == pytest.approx(float(expected), rel=1e-9, abs=1e-9), key


@pytest.fixture
def gamed_file(ae, tmp_path, monkeypatch):
    """Writes a df_gamed.csv and points alpaca-eval's download at it; returns a function that writes one."""
    path = tmp_path / "df_gamed.csv"

    def fake_download(**kwargs) -> str:
        assert kwargs["filename"] == "df_gamed.csv" and kwargs["repo_id"] == "tatsu-lab/alpaca_eval"
        return str(path)

    monkeypatch.setattr(ae.metrics.glm_winrate, "hf_hub_download", fake_download)

    def write(frame: pd.DataFrame) -> Path:
        frame.to_csv(path, index=False)
        return path

    return write


# ----------------------------------------------------------------------------------------------------------------
# 1. the length-controlled win rate and 2. the win rate


# alpaca-eval's own fit warns that scikit-learn 1.8 deprecated its arguments (penalty="l1")
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize(
    "seed, model_longer, shuffle_first_block",
    [(0, True, False), (1, False, False), (2, True, True)],
    ids=["model-longer-wins", "model-shorter-loses", "gamed-rows-out-of-order"],
)
def test_length_controlled_winrate_is_alpaca_evals(ae, gamed_file, seed, model_longer, shuffle_first_block):
    rng = np.random.default_rng(seed)
    path = gamed_file(_gamed_frame(rng, shuffle_first_block))
    annotations = _annotations(rng, model_longer)

    theirs = ae.metrics.glm_winrate.get_length_controlled_winrate(
        [dict(a) for a in annotations], save_weights_dir=None, is_warn_extreme_changes=False
    )
    ours = length_controlled_winrate(annotations, pd.read_csv(path))
    _assert_same_metrics(ours, theirs)

    # the data sets are what they say, and the fit is not the trivial one (all coefficients 0 predict 50 everywhere)
    assert (theirs["win_rate"] > 50) == model_longer
    assert theirs["lc_standard_error"] > 0.1
    assert abs(theirs["length_controlled_winrate"] - theirs["win_rate"]) > 1
    assert theirs["n_draws"] == 6 and theirs["n_total"] == 118


def test_length_controlled_winrate_of_the_baseline_itself(ae, gamed_file):
    rng = np.random.default_rng(3)
    path = gamed_file(_gamed_frame(rng))
    annotations = [dict(a, generator_2=a["generator_1"]) for a in _annotations(rng, model_longer=True)]

    theirs = ae.metrics.glm_winrate.get_length_controlled_winrate([dict(a) for a in annotations], save_weights_dir=None)
    ours = length_controlled_winrate(annotations, pd.read_csv(path))
    _assert_same_metrics(ours, theirs)
    assert ours["length_controlled_winrate"] == 50 and ours["lc_standard_error"] == 0


def test_length_controlled_winrate_refuses_what_alpaca_eval_cannot_use():
    rng = np.random.default_rng(4)
    gamed = _gamed_frame(rng)
    annotations = _annotations(rng, model_longer=True)
    with pytest.raises(RecordError, match="one model"):
        length_controlled_winrate([*annotations, dict(annotations[0], generator_2="other")], gamed)
    with pytest.raises(RecordError, match="no instruction difficulty"):
        length_controlled_winrate([*annotations, dict(annotations[0], index=N_INSTRUCTIONS)], gamed)
    with pytest.raises(RecordError, match="no 'std_delta_len'"):
        length_controlled_winrate(annotations, gamed.drop(columns="std_delta_len"))
    with pytest.raises(RecordError, match="No annotations"):
        length_controlled_winrate([], gamed)


@pytest.mark.parametrize(
    "preferences",
    [
        [1.0, 2.0, 1.5, 0, 1.25, 1.75, math.nan, None, 1.5000001, 1.4999999],
        [2.5, 0.4, -0.3, 1.0, 2.0, 0.5],  # outside [1, 2]: left out of the rate, but rounded into the discrete one
        [1.3],
        [math.nan, None],
        [0, 0, 1.5],
        list(np.random.default_rng(5).uniform(1, 2, 300)),
    ],
)
def test_win_rate_is_alpaca_evals(ae, preferences):
    theirs = ae.metrics.get_winrate([{"preference": p} for p in preferences])
    _assert_same_metrics(win_rate(preferences), theirs)


# ----------------------------------------------------------------------------------------------------------------
# 3. the judge's messages, 4. the order swap, 5. the logprob parser

AWKWARD_TEXTS = [
    ("Write a haiku.", "Leaves fall.", "Snow melts."),
    ('Explain {x} and "quotes" in Python.', 'Use f"{x}" or """triple""".', "  leading and trailing spaces \n\n"),
    ("Line one\nLine two\n\n", "日本語の答え — é 🙂", "{instruction} is a placeholder"),
    ("What does {output_2} do?", 'A """ closes it', "'single' and \\backslash\\ and \t tab"),
    ("End token", "before <|im_end|> after", "and <|im_end|> again"),  # alpaca-eval cuts the message there
    ("Start token", "x", "<|im_start|>assistant\nan extra message"),  # and starts a new one here
    ("", "", ""),
]


@pytest.mark.parametrize("instruction, output_1, output_2", AWKWARD_TEXTS)
def test_judge_messages_are_alpaca_evals(ae, template, instruction, output_1, output_2):
    row = pd.DataFrame([{"instruction": instruction, "output_1": output_1, "output_2": output_2}])
    prompts, _ = ae.utils.make_prompts(row, template=template, batch_size=1)
    theirs = ae.utils.prompt_to_chatml(prompts[0])
    ours = judge_messages(template, instruction, output_1, output_2)
    assert json.dumps(ours, ensure_ascii=False) == json.dumps(theirs, ensure_ascii=False)


def test_judge_messages_refuse_templates_alpaca_eval_cannot_fill(template):
    with pytest.raises(ConfigError, match="more often"):
        judge_messages(template + "{output_1}", "i", "a", "b")
    with pytest.raises(ConfigError, match="placeholders"):
        judge_messages(template.replace("{output_2}", "{output_3}"), "i", "a", "b")
    with pytest.raises(ConfigError, match="start with"):
        judge_messages("no chat blocks: {instruction} {output_1} {output_2}", "i", "a", "b")


def _switch_processor(ae, monkeypatch):
    """The processor that alpaca-eval's default pairwise annotator uses to swap output_1 and output_2, built by the
    annotator itself (so with its own seed)."""
    monkeypatch.setattr(ae.annotators.base, "get_fn_completions", lambda name: _fake_completions)
    annotator = ae.annotators.PairwiseAnnotator(
        annotators_config=DEFAULT_ANNOTATOR, caching_path=None, packages_for_which_to_show_version=None
    )
    (processor,) = [
        p
        for p in annotator.annotators[DEFAULT_ANNOTATOR].processors
        if isinstance(p, ae.processors.RandomSwitchTwoColumnsProcessor)
    ]
    return processor


def test_is_switched_is_the_annotators_decision(ae, monkeypatch):
    instructions = [f"Instruction {i}: {_text(np.random.default_rng(i), 30)}" for i in range(45)]
    instructions += ["", "   ", "Give me a recipe.", "日本語", 'He said "{x}"']
    frame = pd.DataFrame({"instruction": instructions, "output_1": "baseline", "output_2": "model"})
    swapped = _switch_processor(ae, monkeypatch).preprocess(frame)
    theirs = (swapped["output_1"] == "model").tolist()
    assert [is_switched(i) for i in instructions] == theirs
    assert 10 < sum(theirs) < 40  # both orders occur


def _parse(ae, annotator_config, top_logprobs) -> float:
    completion = {"logprobs": {"content": [{"token": "x", "logprob": 0.0, "top_logprobs": top_logprobs}]}}
    (parsed,) = ae.completion_parsers.logprob_parser(completion, **annotator_config["completion_parser_kwargs"])
    return parsed


def _top(*pairs) -> list[dict]:
    return [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in pairs]


@pytest.mark.parametrize(
    "top_logprobs",
    [
        _top(("M", -0.0176), ("m", -4.0488), ("Both", -14.9), ("The", -15.7), ("Based", -15.9)),
        _top(("m", -0.3), ("M", -1.4)),
        _top(("m", -0.6931471805599453), ("M", -0.6931471805599453)),
        _top(("m", -1e-9), ("M", -45.0)),
        _top(("M", -1e-9), ("m", -800.0)),
        _top(("m", -0.01), ("The", -5.0)),  # only m: 1
        _top(("Model", -0.1), ("M", -3.0)),  # only M: 2
        _top((" m", -0.1), ("M ", -0.2), ("The", -3.0)),  # neither (tokens match exactly): NaN
        [],
        _top(("m", -2.0), ("M", -1.0), ("m", -0.5)),  # a token twice: the last one counts
    ],
)
def test_preference_from_logprobs_is_logprob_parsers(ae, annotator_config, top_logprobs):
    assert annotator_config["completion_parser_kwargs"]["is_binarize"] is False
    theirs = _parse(ae, annotator_config, top_logprobs)
    ours = preference_from_logprobs(top_logprobs)
    if math.isnan(theirs):
        assert math.isnan(ours)
    else:
        assert 1 <= ours <= 2
        assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# 6. text replies and the swap undone


def test_preference_from_text_is_the_binarized_reading():
    assert preference_from_text("m") == 1.0
    assert preference_from_text(" M\n") == 2.0
    for reply in ("", "MM", "Model m", "m.", "1", "M or m"):
        assert preference_from_text(reply) is None


def test_unswitch_undoes_the_swap():
    assert unswitch(1.2, switched=True) == pytest.approx(1.8)
    assert unswitch(1.2, switched=False) == 1.2
    assert unswitch(2.0, switched=True) == 1.0 and unswitch(1.5, switched=True) == 1.5
    assert math.isnan(unswitch(math.nan, switched=True))
    for bad in (0.0, 3.0, 2.5):
        with pytest.raises(RecordError):
            unswitch(bad, switched=True)


# ----------------------------------------------------------------------------------------------------------------
# all of it at once: alpaca-eval's own annotator on a head-to-head, with a fake judge, against our functions chained
# the way the runner chains them


def _fake_judge(messages: list[dict]) -> list[dict]:
    """A judge whose top logprobs are a hash of exactly what it is sent (so a wrong order or a wrong byte shows)."""
    text = json.dumps(messages, ensure_ascii=False)
    if "unparsable" in text:
        return _top(("The", -0.1), ("Both", -2.0))
    digest = hashlib.sha256(text.encode()).digest()
    return _top(("m", -digest[0] / 40), ("M", -digest[1] / 40), ("Both", -9.0))


def _fake_completions(prompts, **decoding_kwargs) -> dict:
    """alpaca-eval's openai decoder, less the request: the prompt made chat messages by its prompt_to_chatml (as the
    decoder does for chat models) and the fake judge's reply in OpenAI's shape."""
    import alpaca_eval.utils

    assert decoding_kwargs["max_tokens"] == 1 and decoding_kwargs["top_logprobs"] == 5
    replies = [
        {"logprobs": {"content": [{"top_logprobs": _fake_judge(alpaca_eval.utils.prompt_to_chatml(p))}]}}
        for p in prompts
    ]
    return {
        "completions": [""] * len(prompts),
        "completions_all": replies,
        "price_per_example": [0.0] * len(prompts),
        "time_per_example": [0.0] * len(prompts),
    }


def test_head_to_head_annotation_is_alpaca_evals(ae, monkeypatch, template):
    rng = np.random.default_rng(6)
    instructions = [f"Task {i}: {_text(rng, 40)}" for i in range(30)] + ["an unparsable one", "identical outputs"]
    baseline = [_text(rng, int(rng.integers(5, 200))) for _ in instructions]
    model = [_text(rng, int(rng.integers(5, 200))) for _ in instructions]
    model[-1] = baseline[-1]

    monkeypatch.setattr(ae.annotators.base, "get_fn_completions", lambda name: _fake_completions)
    annotator = ae.annotators.PairwiseAnnotator(
        annotators_config=DEFAULT_ANNOTATOR, caching_path=None, packages_for_which_to_show_version=None
    )
    annotated = annotator.annotate_head2head(
        outputs_1=[{"instruction": i, "output": o, "generator": "base"} for i, o in zip(instructions, baseline)],
        outputs_2=[{"instruction": i, "output": o, "generator": "ours"} for i, o in zip(instructions, model)],
    )
    theirs = {a["instruction"]: a["preference"] for a in annotated}

    for instruction, out_base, out_model in zip(instructions, baseline, model):
        if out_base == out_model:
            ours = 1.5  # alpaca-eval does not ask the judge about identical outputs: the runner's job
        else:
            switched = is_switched(instruction)
            shown = (out_model, out_base) if switched else (out_base, out_model)
            reply = _fake_judge(judge_messages(template, instruction, *shown))
            ours = unswitch(preference_from_logprobs(reply), switched)
        expected = theirs[instruction]
        if expected is None or (isinstance(expected, float) and math.isnan(expected)):
            assert math.isnan(ours), instruction
        else:
            assert ours == pytest.approx(expected, rel=1e-12, abs=1e-12), instruction
    assert theirs["identical outputs"] == 1.5 and theirs["an unparsable one"] is None
