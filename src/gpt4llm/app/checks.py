"""Checks a composed config before anything is built, so a misspelled key fails at start and says which.

Hydra already rejects overrides of keys that do not exist; this catches the rest (`+data.batch_sise=4`, a typo in
an experiment file) by binding every `_target_` node's keys to the target's signature, without calling it.
"""

from __future__ import annotations

import difflib
import inspect

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig

from gpt4llm.errors import ConfigError


def check_config(cfg: DictConfig, where: str = "") -> None:
    if isinstance(cfg, DictConfig):
        if cfg.get("_target_"):
            _check_target(cfg, where)
        for key in cfg.keys():
            node = cfg._get_node(key)
            if isinstance(node, (DictConfig, ListConfig)):
                check_config(node, f"{where}.{key}" if where else str(key))
    elif isinstance(cfg, ListConfig):
        for i, node in enumerate(cfg._iter_ex(resolve=False)):
            check_config(node, f"{where}[{i}]")


def accepted_parameters(target) -> dict[str, inspect.Parameter] | None:
    """The keyword parameters `target` accepts, None when it takes any. One of our classes whose __init__ passes
    **kwargs on to its base (the data and model modules do) accepts its base's parameters too; elsewhere **kwargs
    may go anywhere (Lightning's DDPStrategy hands them to torch's DDP), so anything is accepted."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # builtins without a Python signature
        return None
    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    params = {name: p for name, p in signature.parameters.items() if p.kind not in kinds}
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return params
    if not (inspect.isclass(target) and target.__module__.startswith("gpt4llm.")):
        return None
    base = next((c for c in target.__mro__[1:] if "__init__" in c.__dict__), None)
    inherited = accepted_parameters(base) if base is not None and base is not object else None
    return None if inherited is None else inherited | params


def _check_target(node: DictConfig, where: str) -> None:
    try:
        target = get_object(node._target_)
    except Exception as err:
        raise ConfigError(f"{where}._target_: cannot import '{node._target_}' ({err})") from err
    params = accepted_parameters(target)
    if params is None:
        return
    for key in node.keys():
        if str(key).startswith("_") or key in params:
            continue
        close = difflib.get_close_matches(str(key), list(params), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else f" It accepts: {', '.join(params)}."
        raise ConfigError(f"{where}.{key}: {node._target_} has no parameter '{key}'.{hint}")


# Settings that must be in range, checked before anything is built or written: key -> (test, what it must be).
# A key a config does not have is skipped (prepare has no trainer block worth checking, the reward task no packing).
def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _at_least(low):
    return lambda v: _number(v) and v >= low


def _whole(low):
    """A whole number >= low (2.5 held-out records or 0.5 batches mean a typo, not a setting)."""
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _positive(v):
    return _number(v) and v > 0


def _optional(test):
    return lambda v: v is None or test(v)


RANGES: dict[str, tuple] = {
    "model.max_length": (_whole(1), "a whole number >= 1 (tokens)"),
    # data.* after model.*: data.max_length is ${model.max_length} unless set, and the key set is the one to name
    "data.val_size": (
        lambda v: v == "auto" or _whole(0)(v),
        "a whole number >= 0 (records held out; 0 holds nothing out) or auto (5% of the records, at most 200)",
    ),
    "data.batch_size": (_whole(1), "a whole number >= 1"),
    "data.eval_batch_size": (_optional(_whole(1)), "null or a whole number >= 1"),
    "data.max_length": (_whole(1), "a whole number >= 1 (tokens)"),
    "data.num_workers": (_whole(0), "a whole number >= 0"),
    "data.split_seed": (_whole(0), "a whole number >= 0"),
    "task.optimizer.lr": (_positive, "> 0"),
    "task.optimizer.eps": (_positive, "> 0"),
    "task.optimizer.weight_decay": (_at_least(0), ">= 0"),
    "task.warmup_ratio": (lambda v: _at_least(0)(v) and v <= 1, "between 0 and 1"),
    "global_batch_size": (_optional(_whole(1)), "null or a whole number >= 1"),
    "trainer.max_steps": (lambda v: v == -1 or _whole(1)(v), "-1 (no limit) or a whole number >= 1"),
    "trainer.max_epochs": (_optional(lambda v: v == -1 or _whole(1)(v)), "null, -1 or a whole number >= 1"),
    "trainer.accumulate_grad_batches": (_whole(1), "a whole number >= 1"),
    "trainer.gradient_clip_val": (_optional(_at_least(0)), "null or >= 0"),
    "trainer.log_every_n_steps": (_whole(1), "a whole number >= 1"),
}


def check_values(cfg: DictConfig) -> None:
    """Every setting of RANGES that the config has, in range; else a ConfigError naming the key and the range."""
    from omegaconf import OmegaConf

    for key, (test, expected) in RANGES.items():
        value = OmegaConf.select(cfg, key, default="<absent>")
        if isinstance(value, str) and value == "<absent>":
            continue
        if not test(value):
            raise ConfigError(f"{key}={value!r}: must be {expected}")
