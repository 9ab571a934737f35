"""Every output file or directory is written beside its target and renamed into place when complete, so a killed or
failed run never leaves half of one where a later run would take it for whole."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(target: str | Path, suffix: str = "tmp") -> Iterator[Path]:
    """A path beside `target` to write a file or a directory into; on success it replaces `target`, on any error it
    is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{suffix}-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)  # os.replace cannot replace a directory that has files
        os.replace(tmp, target)
    finally:
        _remove(tmp)


def write_text(target: str | Path, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_jsonl(target: str | Path, rows: Iterable[dict]) -> Path:
    return write_text(target, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
