"""Checks a composed config before anything is built, so a misspelled key fails at start and says which.

Hydra already rejects overrides of keys that do not exist; this catches the rest (`+data.batch_sise=4`, a typo in
an experiment file) by binding every `_target_` node's keys to the target's signature, without calling it.
"""

from __future__ import annotations

import difflib
import inspect

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig


class ConfigError(ValueError):
    pass


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
