"""Every output file or directory is written beside its target and renamed into place when complete, so a killed or
failed run never leaves half of one where a later run would take it for whole. What a killed process left beside a
target (`<name>.tmp-<pid>`, `<name>.part-<pid>` of a process that no longer runs) is removed by the next write in
that directory. A write that fails for want of space or permission says which path, and what to do."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from gpt4llm.errors import WriteError

TEMPORARY = re.compile(r"\.(tmp|part)-(\d+)$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """The temporaries in `directory` of processes that are gone (killed mid-write), removed."""
    stale = []
    if directory.is_dir():
        for path in directory.iterdir():
            match = TEMPORARY.search(path.name)
            if match and int(match[2]) != os.getpid() and not _alive(int(match[2])):
                _remove(path)
                stale.append(path)
    return stale


def explain(err: OSError, path: Path) -> WriteError:
    what = {
        errno.ENOSPC: "the disk is full: free space there, or point paths.log_dir / paths.data_dir elsewhere",
        errno.EDQUOT: "the disk quota is used up: free space there, or point paths.log_dir / paths.data_dir elsewhere",
        errno.EROFS: "the file system is read-only: point paths.log_dir / paths.data_dir at a writable directory",
        errno.EACCES: "permission denied: point paths.log_dir / paths.data_dir at a directory you can write",
        errno.EPERM: "not permitted (an immutable directory?): point paths.log_dir / paths.data_dir elsewhere",
    }.get(err.errno)
    if what is None:
        return WriteError(err.errno, f"could not write {path}: {err.strerror or err}")
    return WriteError(err.errno, f"could not write {path}: {what}")


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
    tmp = target.with_name(f"{target.name}.{suffix}-{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target.parent)
        _remove(tmp)
    except OSError as err:
        raise explain(err, target) from err
    try:
        yield tmp
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)  # os.replace cannot replace a directory that has files
        os.replace(tmp, target)
    except OSError as err:
        if isinstance(err, WriteError) or err.errno not in (
            errno.ENOSPC,
            errno.EDQUOT,
            errno.EROFS,
            errno.EACCES,
            errno.EPERM,
        ):
            raise
        raise explain(err, target) from err
    finally:
        _remove(tmp)


def write_text(target: str | Path, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_json(target: str | Path, data, indent: int | None = 4) -> Path:
    return write_text(target, json.dumps(data, ensure_ascii=False, indent=indent) + "\n")


def write_jsonl(target: str | Path, rows: Iterable[dict]) -> Path:
    return write_text(target, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
