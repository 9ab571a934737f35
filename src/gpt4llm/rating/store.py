"""Raters, what each was shown, and their votes, in SQLite (WAL journal, synchronous=FULL): every vote is on disk
before the page hears it was saved, so a killed server loses nothing. Votes are only ever appended; a rater who goes
back and changes a vote adds a new row, and the report takes each rater's latest vote per task."""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

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


class VoteStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by FastAPI's worker threads, used under a lock: SQLite serialises writers anyway.
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self.lock = threading.Lock()

    def close(self) -> None:
        self.db.close()

    # -- raters ---------------------------------------------------------------------------------------------------
    def rater_token(self, name: str) -> str:
        """The token of rater `name`, made on first use: entering the same name again resumes."""
        with self.lock:
            row = self.db.execute("SELECT token FROM raters WHERE name = ?", (name,)).fetchone()
            if row:
                return row["token"]
            token = secrets.token_urlsafe(12)
            self.db.execute("INSERT INTO raters VALUES (?, ?, ?)", (token, name, time.time()))
            return token

    def rater_name(self, token: str) -> str | None:
        with self.lock:
            row = self.db.execute("SELECT name FROM raters WHERE token = ?", (token,)).fetchone()
        return row["name"] if row else None

    def rater_names(self) -> list[str]:
        with self.lock:
            return [row["name"] for row in self.db.execute("SELECT name FROM raters ORDER BY created")]

    # -- what each rater sees -------------------------------------------------------------------------------------
    def assigned(self, rater: str) -> list[int]:
        """The tasks shown to `rater`, in the order shown (positions 0, 1, ...)."""
        with self.lock:
            rows = self.db.execute("SELECT task FROM assignments WHERE rater = ? ORDER BY position", (rater,))
            return [row["task"] for row in rows]

    def assign_next(self, rater: str, choose) -> int | None:
        """Appends the task `choose(assigned_to_rater, shown_counts)` picks to rater's sequence (None: nothing left).
        Chosen under the lock, so two raters asking at once see each other's assignments."""
        with self.lock:
            mine = {row["task"] for row in self.db.execute("SELECT task FROM assignments WHERE rater = ?", (rater,))}
            counts = {
                row["task"]: row["n"]
                for row in self.db.execute("SELECT task, COUNT(*) AS n FROM assignments GROUP BY task")
            }
            task = choose(mine, counts)
            if task is not None:
                self.db.execute("INSERT INTO assignments VALUES (?, ?, ?, ?)", (rater, len(mine), task, time.time()))
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
