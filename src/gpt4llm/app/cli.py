"""What every `python -m gpt4llm.<entry point>` shares: where the configs live and how logs reach the console."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable

from gpt4llm.app import resolvers

# The repository's top-level conf/, which the wheel ships as the package gpt4llm.conf (pyproject.toml, package-dir):
# found the same way in a checkout, an editable install and a regular one, from any directory.
CONFIG_PATH = "pkg://gpt4llm.conf"
resolvers.register()


def use_hydra_logging() -> None:
    """Hydra's root handlers already print and write `<run dir>/<job>.log`; the `lightning` package adds a console
    handler of its own on import, which would print every Lightning message twice."""
    import lightning  # noqa: F401  (the handler is added on first import)

    logging.getLogger("lightning").handlers.clear()


def user_error_types() -> tuple[type[BaseException], ...]:
    """The errors whose message tells a user what to do (imported when one happens: commands start fast)."""
    from gpt4llm.app.checks import ConfigError
    from gpt4llm.app.http import ServerStartError
    from gpt4llm.data.records import RecordError
    from gpt4llm.data.sources import DownloadError
    from gpt4llm.inference.openai_client import TooFewSucceeded
    from gpt4llm.io.atomic import WriteError
    from gpt4llm.models.base import CheckpointError
    from gpt4llm.reproduction.stages import StageFailed

    return (ConfigError, RecordError, DownloadError, WriteError, CheckpointError, TooFewSucceeded, ServerStartError,
            StageFailed,
            FileNotFoundError, IsADirectoryError, NotADirectoryError)


def reports_user_errors(main: Callable) -> Callable:
    """What a user can act on (a bad setting or record, a missing or unwritable file) ends the command with its
    one-line message and exit status 1, not a traceback; GPT4LLM_TRACEBACK=1 shows the traceback as well."""

    @functools.wraps(main)
    def run(cfg):
        try:
            return main(cfg)
        except Exception as err:
            if os.environ.get("GPT4LLM_TRACEBACK") or not isinstance(err, user_error_types()):
                raise
            _remove_empty_run_directory()
            print(f"Error: {err}", file=sys.stderr)
            sys.exit(1)

    return run


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
