"""Every output file or directory is written beside its target and renamed into place when complete, so a killed or
failed run never leaves half of one where a later run would take it for whole. What a killed process left beside a
target (`<name>.tmp-<pid>`, `<name>.part-<pid>` of a process that no longer runs) is removed by the next write in
that directory. A write that fails for want of space or permission says which path, and what to do."""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterator
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


def umask() -> int:
    """The process's umask: from /proc (Linux), else by setting it and setting it back at once (os.umask can only be
    read that way, and a thread creating a file in between would get the temporary mask)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _respect_umask(path: Path) -> None:
    """Files and directories under `path` with the modes the umask gives new ones: some writers create theirs 0600
    (safetensors' weights, tempfile), which would keep a teammate on a shared cluster from loading an export."""
    if not path.exists():
        return
    mask = umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in paths:
        if not item.is_symlink():
            item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_path(target: str | Path, suffix: str = "tmp", private: bool = False) -> Iterator[Path]:
    """A path beside `target` to write a file or a directory into; on success it replaces `target`, on any error it
    is removed. What was written gets the modes the umask gives (readable by the group and others under the usual
    022), or owner-only with `private` (files that hold secrets)."""
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
        if private:
            for item in [tmp, *tmp.rglob("*")] if tmp.is_dir() else [tmp]:
                item.chmod(0o700 if item.is_dir() else 0o600)
        else:
            _respect_umask(tmp)
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
