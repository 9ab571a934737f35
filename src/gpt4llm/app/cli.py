"""What every `python -m gpt4llm.<entry point>` shares: where the configs live, how logs reach the console, and the one
failure policy (a GPT4LLMError ends the command in one line; anything else is a bug and keeps its traceback)."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable

from gpt4llm.app import resolvers
from gpt4llm.errors import ConfigError, GPT4LLMError

# The repository's top-level conf/, which the wheel ships as the package gpt4llm.conf (pyproject.toml, package-dir):
# found the same way in a checkout, an editable install and a regular one, from any directory.
CONFIG_PATH = "pkg://gpt4llm.conf"
resolvers.register()


def use_hydra_logging() -> None:
    """Hydra's root handlers already print and write `<run dir>/<job>.log`; the `lightning` package adds a console
    handler of its own on import, which would print every Lightning message twice."""
    import lightning  # noqa: F401  (the handler is added on first import)

    logging.getLogger("lightning").handlers.clear()
    quiet_libraries()


# Lines the libraries print on every run that tell a user nothing to act on, by logger: an advertisement, DeepSpeed
# saying it runs on the CPU it was asked to run on, bitsandbytes' optional CPU kernels package.
NOISE = {
    "lightning.pytorch.utilities.rank_zero": "💡 Tip:",
    "DeepSpeed": "Setting accelerator to CPU",
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
}
# Deprecations inside the libraries (not in anything a user wrote), printed on every run.
NOISY_WARNINGS = (
    r"'set_vital' is deprecated",  # torchdata's StatefulDataLoader
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's pytree helper
    r"`is_gradient_checkpointing` is deprecated",  # peft asking transformers
)


def quiet_libraries() -> None:
    """A run's console shows what the user needs: the libraries' per-run noise (above) is dropped, and so are
    transformers' "Loading weights" bars, one per model load (the run logs what it loads)."""
    import warnings

    from transformers.utils import logging as hf_logging

    for name, start in NOISE.items():
        logging.getLogger(name).addFilter(lambda record, start=start: not record.getMessage().startswith(start))
    for message in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    hf_logging.disable_progress_bar()


def hydra_command(config_name: str) -> Callable:
    """`hydra.main` for a command's config, and, when the command line names a setting the config does not have
    (`trainer.max_step=10`), a last `Error:` line with the nearest one: Hydra's own advice, `+trainer.max_step=10`,
    would add a key that nothing reads."""
    import hydra

    def decorate(function: Callable) -> Callable:
        hydra_main = hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=config_name)(function)

        @functools.wraps(hydra_main)
        def run(*args, **kwargs):
            try:
                return hydra_main(*args, **kwargs)
            except SystemExit as exited:
                hint = unknown_setting(config_name, sys.argv[1:]) if exited.code not in (0, None) else None
                if hint:
                    print(f"Error: {hint}", file=sys.stderr)
                raise

        return run

    return decorate


def unknown_setting(config_name: str, arguments: list[str]) -> str | None:
    """What is wrong with the first `key=value` whose key the composed config does not have, with the nearest key
    that it does have; None when every key is known."""
    import difflib

    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    overrides = [a for a in arguments if "=" in a and not a.startswith(("+", "~", "-", "hydra."))]
    choices = [o for o in overrides if not {".", "/"} & set(o.split("=", 1)[0])]  # model=hf, experiment=...
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("gpt4llm.conf", version_base="1.3"):
            config = compose(config_name, overrides=choices)
    except Exception:  # a wrong group choice: Hydra's own message says which
        return None
    finally:
        GlobalHydra.instance().clear()
    keys = list(_leaf_keys(OmegaConf.to_container(config, resolve=False)))
    for override in overrides:
        key, value = override.split("=", 1)
        if "." in key and key not in keys and not any(k.startswith(key + ".") for k in keys):
            nearest = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
            advice = f": did you mean {nearest[0]}={value}?" if nearest else ": `--cfg job` lists the settings"
            return f"{key} is not a setting{advice} (a leading + would add a key that nothing reads)"
    return None


def _leaf_keys(node, prefix: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaf_keys(value, f"{prefix}{key}.")
        if prefix:
            yield prefix[:-1]  # a whole section can be set too (model.tiny=null)
    else:
        yield prefix[:-1]


def reports_user_errors(main: Callable) -> Callable:
    """What a user can act on (gpt4llm.errors: a bad setting or record, a missing or unwritable file) ends the command
    with its one-line message and exit status 1, not a traceback; GPT4LLM_TRACEBACK=1 shows the traceback as well."""

    @functools.wraps(main)
    def run(cfg):
        try:
            return main(cfg)
        except Exception as err:
            cause = user_error(err)
            if os.environ.get("GPT4LLM_TRACEBACK") or cause is None:
                raise
            _remove_empty_run_directory()
            print(f"Error: {cause}", file=sys.stderr)
            sys.exit(1)

    return run


def user_error(err: BaseException) -> GPT4LLMError | None:
    """The GPT4LLMError behind `err`, also where a library wrapped it (Hydra's instantiate raises its own
    InstantiationException from the error a constructor raised)."""
    from omegaconf.errors import MissingMandatoryValue

    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, GPT4LLMError):
            return err
        if isinstance(err, MissingMandatoryValue):  # a `???` in the command's config that nobody set
            key = err.full_key or "a setting"
            return ConfigError(f"{key} is required: pass {key}=<value> (--help lists the settings)")
        seen.add(id(err))
        err = err.__cause__
    return None


def _remove_empty_run_directory() -> None:
    """A run that stopped before writing anything of its own leaves no directory behind (Hydra made it, with its
    config and log, before the command started)."""
    import shutil
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    out = Path(HydraConfig.get().runtime.output_dir)
    own = {".hydra", f"{HydraConfig.get().job.name}.log"}
    if out.is_dir() and all(p.name in own for p in out.iterdir()):
        # the log file is closed and its handler detached before it is removed: a later line logged in this process
        # (a caller that catches SystemExit) would reopen it in a directory that is gone
        for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
            for handler in list(getattr(logger, "handlers", [])):
                if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == out.resolve():
                    handler.close()
                    logger.removeHandler(handler)
        shutil.rmtree(out, ignore_errors=True)
