"""What every `python -m gpt4llm.<entry point>` shares: where the configs live and how logs reach the console."""

from __future__ import annotations

import logging
from pathlib import Path

CONFIG_PATH = str(Path(__file__).resolve().parents[2] / "conf")  # the repository's conf/ (an editable install)


def use_hydra_logging() -> None:
    """Hydra's root handlers already print and write `<run dir>/<job>.log`; the `lightning` package adds a console
    handler of its own on import, which would print every Lightning message twice."""
    import lightning  # noqa: F401  (the handler is added on first import)

    logging.getLogger("lightning").handlers.clear()
