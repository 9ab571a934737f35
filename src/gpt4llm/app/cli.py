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
        logging.shutdown()  # the log file is closed before it is removed
        shutil.rmtree(out, ignore_errors=True)
