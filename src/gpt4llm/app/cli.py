"""What every `python -m gpt4llm.<entry point>` shares: where the configs live and how logs reach the console."""

from __future__ import annotations

import logging

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
