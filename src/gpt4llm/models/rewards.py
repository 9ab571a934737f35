"""What online RL (task=grpo|rloo) scores its completions with, `reward=` (conf/reward):

    function   a Python function with TRL's signature, `reward.fn=package.module:name` (models.reward_functions);
               verifiable rewards, and the tests
    model      a reward-model export of `task=rm`, `reward.path=...` (the paper's RM): the completion scored with the
               prompt as the reward model's own training rendered it, in its own tokenizer (decoded text re-encoded)

    judge      a served OpenAI-compatible model scoring 1-10 under a rubric (evaluation.judge_reward, which the train
               command hands in as a factory: its client lives in a layer above this one)

One source, or several: `reward.also.<name>={kind: ..., weight: ...}` adds more; the reward is the weighted sum, and
each source's mean is logged as `rewards/<name>/mean` (TRL's names).
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from gpt4llm.errors import ConfigError

KINDS = ("function", "model", "judge")
ScoreFn = Callable[[list[str], list[str], dict[str, list], list[list[int]]], list]


@dataclass
class Scores:
    """What a reward factory makes: the scoring function, and what scoring has cost so far (a judge's tokens and
    dollars; None: nothing)."""

    score: ScoreFn
    cost: Callable[[], dict[str, float]] | None = None


@dataclass
class Reward:
    name: str  # rewards/<name>/mean
    weight: float
    setting: str  # the setting it came from, for errors: reward.fn=..., reward.path=...
    # (prompts, completions, fields, completion_ids) -> one number per completion
    score: ScoreFn
    cost: Callable[[], dict[str, float]] | None = None


def build_rewards(settings: dict, device=None, factories: dict[str, Callable] | None = None) -> list[Reward]:
    """The reward sources `settings` (the `reward` config) name: loaded now, so a function that does not import or a
    reward model that does not load stops the run before step 1. `factories`: kind -> (setting prefix, spec) ->
    Scores, for kinds built above this layer (the judge)."""
    settings = dict(settings or {})
    also = dict(settings.pop("also", None) or {})
    sources = [_build("reward", settings, device, factories=factories or {})]
    sources += [
        _build(f"reward.also.{name}", dict(spec or {}), device, name, factories or {}) for name, spec in also.items()
    ]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"reward: two sources are named {sorted(n for n in names if names.count(n) > 1)[0]!r}")
    return sources


def _build(prefix: str, spec: dict, device, name: str | None = None, factories: dict | None = None) -> Reward:
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ConfigError(
            f"{prefix}.kind={kind!r}: choose function (reward=function reward.fn=package.module:name), model "
            f"(reward=model reward.path=<a task=rm export>) or judge (reward=judge reward.model=...)"
        )
    weight = spec.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
        raise ConfigError(f"{prefix}.weight={weight!r}: a finite number")
    if kind == "judge":
        if "judge" not in (factories or {}):
            raise ConfigError(f"{prefix}.kind=judge: a judge reward is built by `python -m gpt4llm.train`")
        made = factories["judge"](prefix, spec)
        label = name or spec.get("name") or "judge"
        return Reward(label, float(weight), f"{prefix}.model={spec.get('model')}", made.score, made.cost)
    if kind == "function":
        fn = load_function(spec.get("fn"), f"{prefix}.fn")
        kwargs = dict(spec.get("kwargs") or {})
        setting = f"{prefix}.fn={spec['fn']}"
        label = name or spec.get("name") or fn.__name__
        return Reward(label, float(weight), setting, _function_score(partial(fn, **kwargs)))
    path = spec.get("path")
    if not path:
        raise ConfigError(f"{prefix}.path is not set: point it at a reward-model export (a task=rm run's export/)")
    label = name or spec.get("name") or "model"
    return Reward(label, float(weight), f"{prefix}.path={path}", _model_score(prefix, spec, device))


def load_function(target, setting: str) -> Callable:
    """`package.module:name` (or `package.module.name`) as a callable, or a ConfigError naming the setting."""
    if not isinstance(target, str) or not target.strip():
        raise ConfigError(f"{setting} is not set: name a function as package.module:name")
    module_name, _, attribute = target.partition(":") if ":" in target else target.rpartition(".")
    if not module_name or not attribute:
        raise ConfigError(f"{setting}={target}: name a function as package.module:name")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or the module's own code failing on import
        raise ConfigError(
            f"{setting}={target}: module {module_name} cannot be imported ({type(err).__name__}: {err})"
        ) from None
    if not hasattr(module, attribute):
        raise ConfigError(f"{setting}={target}: {module_name} has no function {attribute!r}")
    fn = getattr(module, attribute)
    if not callable(fn):
        raise ConfigError(f"{setting}={target}: {module_name}.{attribute} is a {type(fn).__name__}, not a function")
    return fn


def _function_score(fn: Callable) -> Callable:
    def score(prompts, completions, fields, completion_ids):
        return fn(prompts, completions, completion_ids=completion_ids, **fields)

    return score


def _model_score(prefix: str, spec: dict, device) -> Callable:
    from gpt4llm.models.reward_scoring import RewardModelScorer

    path = spec["path"]
    try:
        scorer = RewardModelScorer(path, device=device, batch_size=int(spec.get("batch_size") or 8))
    except Exception as err:  # a missing directory, no config, another architecture: transformers' many errors
        raise ConfigError(
            f"{prefix}.path={path}: does not load as a reward model ({type(err).__name__}: {str(err)[:200]}); "
            f"point it at the export of a task=rm run"
        ) from None
    statistics = scorer.statistics() if spec.get("normalize") else None
    if spec.get("normalize") and statistics is None:
        raise ConfigError(
            f"{prefix}.normalize=true: {path} records no reward mean and std (trained without validation data)"
        )

    def score(prompts, completions, fields, completion_ids):
        rewards = scorer(fields["score_record"], completions)
        return [(r - statistics[0]) / statistics[1] for r in rewards] if statistics else rewards

    return score


def score_completions(
    rewards: list[Reward], prompts: list[str], completions: list[str], fields: dict[str, list], completion_ids
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted sum of every source's rewards (fp32, one per completion) and each source's own, checked: a source
    that raises, or returns another count than the completions or something not a finite number, is a ConfigError
    naming it."""
    per_source = {}
    for reward in rewards:
        try:
            values = reward.score(prompts, completions, fields, completion_ids)
        except ConfigError:
            raise
        except Exception as err:
            raise ConfigError(
                f"{reward.setting}: raised {type(err).__name__} on {len(completions)} completions: {str(err)[:300]}"
            ) from err
        values = list(values) if values is not None else []
        if len(values) != len(completions):
            raise ConfigError(
                f"{reward.setting}: returned {len(values)} values for {len(completions)} completions; a reward "
                f"returns one number per completion"
            )
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)]
        if bad:
            raise ConfigError(f"{reward.setting}: returned {bad[0]!r} among its rewards; each must be a finite number")
        per_source[reward.name] = torch.tensor([float(v) for v in values], dtype=torch.float32)
    total = sum(r.weight * per_source[r.name] for r in rewards)
    return total, per_source
