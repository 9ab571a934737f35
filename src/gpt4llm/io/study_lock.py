"""One running process per study directory (a humaneval server, a reproduce run): the holder keeps an flock on
`<directory>/<name>` and writes its pid, host, start time and command into it; a second process stops at once with
a message naming the holder. The kernel drops an flock when its process dies (even by SIGKILL), so a lock file left
by a dead process is simply taken over; what it said is returned so the caller can mention it. A training run's
directory is locked the same way (gpt4llm.training.resume.run_directory_lock), its lock file removed at the end."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from gpt4llm.errors import GPT4LLMError


class LockHeld(GPT4LLMError):
    """Another process holds the study's lock; the message names its pid, host, start time and command."""


def describe(holder: dict[str, Any]) -> str:
    """'pid 123 on host, started 2024-05-01 12:00:00 (python -m gpt4llm.humaneval ...)'."""
    if not holder:
        return "another process (it has not written its pid yet)"
    return (
        f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')} "
        f"({holder.get('command', '?')})"
    )


def read_holder(path: str | Path) -> dict[str, Any]:
    """What the lock file says about its (last) holder; {} for a missing, empty or unreadable one."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


@contextmanager
def study_lock(
    directory: str | Path,
    name: str = "lock",
    action: str = "use this study",
    command: str | None = None,
    advice: str = "wait for it to end or stop it (kill <pid>), then run this again",
    remove: bool = False,
) -> Iterator[dict[str, Any]]:
    """Holds `<directory>/<name>` while the block runs, or raises LockHeld at once when a live process holds it
    ("cannot <action>: <directory> is in use by pid ...; <advice>", the holder's pid in place of <pid>). Yields what
    the file said before (the holder of a stale lock, {} if none): a dead holder's lock is taken over. `command`: how
    the holder is described (its argv). `remove`: the file is deleted on release (while still held), so a directory
    left behind holds no lock file; a process that opened it just before is told apart by the file it locked no
    longer being the one at the path."""
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        # "a+" creates without truncating: the current holder's details stay readable until we own the lock.
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held for the whole block)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            holder = read_holder(path)
            raise LockHeld(
                f"cannot {action}: {Path(directory)} is in use by {describe(holder)}; "
                + advice.replace("<pid>", str(holder.get("pid", "<pid>")))
            ) from None
        if _still_at(path, handle):
            break
        handle.close()  # locked a file its holder had removed on release: lock the one at the path now
    try:
        previous = read_holder(path)
        handle.seek(0)
        handle.truncate()
        handle.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started": datetime.now().astimezone().isoformat(sep=" ", timespec="seconds"),
                    "command": command or " ".join(sys.argv),
                }
            )
        )
        handle.flush()
        try:
            yield previous
        finally:
            if remove:
                path.unlink(missing_ok=True)
            else:
                handle.seek(0)
                handle.truncate()  # nobody holds it now: a reader must not name us
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


def _still_at(path: Path, handle) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False
