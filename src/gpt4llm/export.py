"""The final model in Hugging Face format: `from_pretrained(<run dir>/export)` loads model and tokenizer."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def export_hf(model, tokenizer, directory: str | Path) -> Path:
    """Saves into a sibling directory and renames it into place, so a failed save never looks like an export."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory
