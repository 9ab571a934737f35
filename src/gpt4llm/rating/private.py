"""A study's files are its owner's alone: votes.sqlite (with its -wal, -shm and -journal), study.json (it holds the
secret that orders A and B), votes_held.json, the lock and the reports are created 0600 and the study's directory
0700, whatever the umask, so another account on the machine reads none of them. Files an older version left
readable by others are made owner-only when the study is opened again."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

FILE_MODE = 0o600
DIRECTORY_MODE = 0o700


def private_directory(directory: str | Path) -> Path:
    """`directory`, made if missing (its parents as the umask makes them), owner-only (0700)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    owner_only(directory)
    return directory


def private_file(path: str | Path) -> Path:
    """`path`, created empty and 0600 if missing, before anything is written into it (SQLite would make a new
    database 0644 under the usual umask, and copies the database's mode to its -wal and -shm); an existing one is
    made owner-only."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    except FileExistsError:
        owner_only(path)
        return path
    try:
        os.fchmod(fd, FILE_MODE)  # 0600 even under an umask that would take the owner's bits
    finally:
        os.close(fd)
    return path


def owner_only(path: str | Path) -> None:
    """Takes the group's and others' permissions off `path` (a directory: 0700 at most, a file: 0600 at most, the
    owner's own bits kept). A link, a missing path or one another account owns is left as it is."""
    path = Path(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode) or info.st_uid != os.geteuid():
        return
    mode = stat.S_IMODE(info.st_mode)
    wanted = DIRECTORY_MODE if stat.S_ISDIR(info.st_mode) else FILE_MODE
    if mode & ~wanted:
        try:
            os.chmod(path, mode & wanted)
        except OSError as err:
            log.warning(f"Could not make {path} readable by its owner only ({err.strerror or err})")


def owner_only_tree(directory: str | Path) -> None:
    """`directory` and everything in it (links not followed) owner-only: files 0600, directories 0700."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    owner_only(directory)
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            owner_only(Path(root) / name)
