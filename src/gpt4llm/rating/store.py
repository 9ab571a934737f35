"""Raters, what each was shown, and their votes, in SQLite (WAL journal, synchronous=FULL): every vote is on disk
before the page hears it was saved, so a killed server loses nothing. Votes are only ever appended; a rater who goes
back and changes a vote adds a new row, and the report takes each rater's latest vote per task.

A rater's token is their key: it is made with `secrets` and never derived from the name. Names are compared after
`normal_name` (stripped, Unicode NFC).

The store knows how many votes it held: `votes_held.json` beside it records the count after every vote, so a store
that went missing, was emptied (0 bytes) or lost votes is refused when opened instead of passing for a new study."""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gpt4llm.errors import RecordError
from gpt4llm.io.atomic import write_json

SCHEMA = """
CREATE TABLE IF NOT EXISTS raters (token TEXT PRIMARY KEY, name TEXT UNIQUE NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS assignments (
    rater TEXT NOT NULL, position INTEGER NOT NULL, task INTEGER NOT NULL, shown REAL NOT NULL,
    PRIMARY KEY (rater, position), UNIQUE (rater, task));
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY AUTOINCREMENT, rater TEXT NOT NULL, task INTEGER NOT NULL, item TEXT NOT NULL,
    model_a TEXT NOT NULL, model_b TEXT NOT NULL, choices TEXT NOT NULL, comment TEXT NOT NULL,
    seconds REAL, at REAL NOT NULL);
"""
MAX_NAME = 80


def normal_name(name: str) -> str:
    """A rater's name as compared and stored: stripped, Unicode NFC (so 'ann ', 'ann' and a decomposed 'é' are one
    name). ValueError for a blank or over-long name, or one that is not text (a lone surrogate, a control char)."""
    name = unicodedata.normalize("NFC", str(name)).strip()
    if not name:
        raise ValueError("a rater's name cannot be blank")
    if len(name) > MAX_NAME:
        raise ValueError(f"a rater's name has at most {MAX_NAME} characters")
    if any(unicodedata.category(c) in ("Cs", "Cc") for c in name):
        raise ValueError("a rater's name must be plain text (no control characters or lone surrogates)")
    return name


class VoteStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.held_path = self.path.with_name(f"{self.path.stem}_held.json")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        held = self._held()
        if held and (not self.path.is_file() or self.path.stat().st_size == 0):
            state = "missing" if not self.path.exists() else "empty (0 bytes)"
            raise RecordError(
                f"{self.path}: {state}, but this study's store held {held} votes ({self.held_path}): restore "
                f"{self.path.name} (with {self.path.name}-wal if there was one) from a backup; nothing was changed"
            )
        # One connection shared by FastAPI's worker threads, used under a lock: SQLite serialises writers anyway.
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
            check = self.db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(check)
            self.votes_held = self.db.execute("SELECT COUNT(*) FROM votes").fetchone()[0]
        except sqlite3.DatabaseError as err:
            self.db.close()
            raise RecordError(
                f"{self.path}: not a readable SQLite database ({err}): restore it from a backup, or start a new "
                "study with study=<new dir>"
            ) from None
        if self.votes_held < held:
            self.db.close()
            raise RecordError(
                f"{self.path}: holds {self.votes_held} votes, but this study's store held {held} ({self.held_path}): "
                "votes were lost; restore it from a backup"
            )
        self.lock = threading.Lock()

    def _held(self) -> int:
        """The vote count recorded beside the store (0: none recorded, a new study or one made before the record)."""
        try:
            return int(json.loads(self.held_path.read_text(encoding="utf-8"))["votes"])
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError, TypeError):
            raise RecordError(
                f"{self.held_path}: unreadable; it records how many votes {self.path.name} held: restore it from a "
                "backup, or delete it if you are sure the store is complete"
            ) from None

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """Under the thread lock, one SQLite write transaction (taken at once, so a second process waits)."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    # -- raters ---------------------------------------------------------------------------------------------------
    def add_rater(self, name: str) -> str | None:
        """A new rater's token; None when the name is taken (the start page must not hand out someone's key)."""
        name = normal_name(name)
        with self._transaction():
            if self.db.execute("SELECT 1 FROM raters WHERE name = ?", (name,)).fetchone():
                return None
            token = secrets.token_urlsafe(16)
            self.db.execute("INSERT INTO raters VALUES (?, ?, ?)", (token, name, time.time()))
            return token

    def rater_token(self, name: str) -> str:
        """The token of rater `name`, made on first use: for the links the operator prints (raters=[...]), and the
        start page of a study with open sign-up."""
        name = normal_name(name)
        with self.lock:
            row = self.db.execute("SELECT token FROM raters WHERE name = ?", (name,)).fetchone()
        return row["token"] if row else self.add_rater(name) or self.rater_token(name)

    def rater_name(self, token: str) -> str | None:
        with self.lock:
            row = self.db.execute("SELECT name FROM raters WHERE token = ?", (token,)).fetchone()
        return row["name"] if row else None

    # -- what each rater sees -------------------------------------------------------------------------------------
    def assigned(self, rater: str) -> list[int]:
        """The tasks shown to `rater`, in the order shown (positions 0, 1, ...)."""
        with self.lock:
            rows = self.db.execute("SELECT task FROM assignments WHERE rater = ? ORDER BY position", (rater,))
            return [row["task"] for row in rows]

    def deal(
        self, rater: str, position: int, choose: Callable[[set[int], dict[int, int]], int | None] | None = None
    ) -> int | None:
        """The task at `position` of rater's sequence. The position after the last is dealt here, to the task
        `choose(assigned_to_rater, shown_counts)` picks, when `choose` is given. None: nothing there (not dealt yet,
        or nothing left to deal). One transaction: two requests for one position at once (two tabs, a double
        reload) get the same task, and two raters asking at once see each other's assignments."""
        with self._transaction():
            row = self.db.execute(
                "SELECT task FROM assignments WHERE rater = ? AND position = ?", (rater, position)
            ).fetchone()
            if row or choose is None:
                return row["task"] if row else None
            mine = {row["task"] for row in self.db.execute("SELECT task FROM assignments WHERE rater = ?", (rater,))}
            if position != len(mine):
                return None
            counts = {
                row["task"]: row["n"]
                for row in self.db.execute("SELECT task, COUNT(*) AS n FROM assignments GROUP BY task")
            }
            task = choose(mine, counts)
            if task is not None:
                self.db.execute("INSERT INTO assignments VALUES (?, ?, ?, ?)", (rater, position, task, time.time()))
            return task

    # -- votes ----------------------------------------------------------------------------------------------------
    def add_vote(
        self,
        rater: str,
        task: int,
        item: str,
        shown: tuple[str, str],
        choices: dict[str, str],
        comment: str,
        seconds: float | None,
    ) -> None:
        with self.lock:
            self.db.execute(
                "INSERT INTO votes (rater, task, item, model_a, model_b, choices, comment, seconds, at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (rater, task, item, shown[0], shown[1], json.dumps(choices), comment, seconds, time.time()),
            )
            self.votes_held += 1
            write_json(self.held_path, {"votes": self.votes_held})

    def latest_votes(self, rater: str | None = None) -> list[dict[str, Any]]:
        """Each rater's last vote per task, oldest first."""
        query = (
            "SELECT * FROM votes WHERE id IN (SELECT MAX(id) FROM votes GROUP BY rater, task)"
            + (" AND rater = ?" if rater else "")
            + " ORDER BY id"
        )
        with self.lock:
            rows = self.db.execute(query, (rater,) if rater else ()).fetchall()
        return [dict(row) | {"choices": json.loads(row["choices"])} for row in rows]

    def count_votes(self) -> int:
        with self.lock:
            return self.db.execute("SELECT COUNT(*) FROM votes").fetchone()[0]
