"""Raters, what each was shown, and their votes, in SQLite (WAL journal, synchronous=FULL): every vote is on disk
before the page hears it was saved, so a killed server loses nothing. Votes are only ever appended; a rater who goes
back and changes a vote adds a new row, and the report takes each rater's latest vote per task.

A rater's link token is their key: it is made with `secrets` and never derived from the name, and the store keeps
only its SHA-256 digest (table `links`), never the token, so whoever reads votes.sqlite cannot rate as anyone. A link
can therefore be shown only when it is made: `add_rater` (a new rater) and `new_link` (a new link for a rater, which
ends their earlier ones) return it once. A store written before digests were kept has its tokens replaced by their
digests when opened (the links keep working, and the freed pages are zeroed). The database and its -wal and -shm are
owner-only (0600; gpt4llm.rating.private).

Names are compared after `normal_name`: Unicode NFKC, invisible and format characters removed, whitespace runs
collapsed, so two raters cannot look the same ('ann' and 'ann' with a zero-width space, or full-width 'ａｎｎ').

The store knows how many votes it held: `votes_held.json` beside it records the count after every vote, so a store
that went missing, was emptied (0 bytes) or lost votes is refused when opened instead of passing for a new study."""

from __future__ import annotations

import hashlib
import json
import logging
import re
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
from gpt4llm.io.json_files import write_json
from gpt4llm.rating.private import owner_only, private_directory, private_file

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS raters (name TEXT PRIMARY KEY, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS links (digest TEXT PRIMARY KEY, rater TEXT NOT NULL, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS links_by_rater ON links (rater);
CREATE TABLE IF NOT EXISTS assignments (
    rater TEXT NOT NULL, position INTEGER NOT NULL, task INTEGER NOT NULL, shown REAL NOT NULL,
    PRIMARY KEY (rater, position), UNIQUE (rater, task));
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY AUTOINCREMENT, rater TEXT NOT NULL, task INTEGER NOT NULL, item TEXT NOT NULL,
    model_a TEXT NOT NULL, model_b TEXT NOT NULL, choices TEXT NOT NULL, comment TEXT NOT NULL,
    seconds REAL, at REAL NOT NULL);
"""
MAX_NAME = 80


# Characters that show as nothing: Unicode's Default_Ignorable_Code_Point (the format characters, category Cf, are
# removed by category: zero-width space and joiners, word joiner, BOM, soft hyphen, the bidi controls; these are the
# others: combining grapheme joiner, Hangul fillers, Khmer inherent vowels, Mongolian and other variation selectors).
INVISIBLE = re.compile(
    "[\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180f\u3164\ufe00-\ufe0f\uffa0\ufff0-\ufff8"
    "\U0001d173-\U0001d17a\U000e0000-\U000e0fff]"
)


def _visible(text: str) -> str:
    return INVISIBLE.sub("", "".join(c for c in text if unicodedata.category(c) != "Cf"))


def normal_name(name: str) -> str:
    """A rater's name as compared and stored: invisible and format characters removed (zero-width space and
    joiners, BOM, bidi controls, variation selectors), Unicode NFKC (full-width and other compatibility forms
    folded, a decomposed 'é' composed), whitespace runs made one space and the ends stripped; so 'ann ', 'ann' with
    a zero-width space, and full-width 'ａｎｎ' are the name 'ann'. ValueError for a blank (also: nothing visible)
    or over-long name, or one that is not text (a lone surrogate, a control character other than whitespace)."""
    name = " ".join(_visible(unicodedata.normalize("NFKC", _visible(str(name)))).split())
    if not name:
        raise ValueError("a rater's name cannot be blank")
    if len(name) > MAX_NAME:
        raise ValueError(f"a rater's name has at most {MAX_NAME} characters")
    if any(unicodedata.category(c) in ("Cs", "Cc") for c in name):
        raise ValueError("a rater's name must be plain text (no control characters or lone surrogates)")
    return name


def link_digest(token: str) -> str:
    """What the store keeps of a link's token: its SHA-256, hex. A token is 16 random bytes, so the digest gives
    nobody the token back."""
    return hashlib.sha256(str(token).encode("utf-8", "surrogatepass")).hexdigest()


class VoteStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.held_path = self.path.with_name(f"{self.path.stem}_held.json")
        private_directory(self.path.parent)
        held = self._held()
        if held and (not self.path.is_file() or self.path.stat().st_size == 0):
            state = "missing" if not self.path.exists() else "empty (0 bytes)"
            raise RecordError(
                f"{self.path}: {state}, but this study's store held {held} votes ({self.held_path}): restore "
                f"{self.path.name} (with {self.path.name}-wal if there was one) from a backup; nothing was changed"
            )
        # Owner-only before SQLite opens it: SQLite gives the -wal, -shm and -journal it makes the database's mode.
        private_file(self.path)
        for extra in ("-wal", "-shm", "-journal"):  # an older version's, made under the umask
            owner_only(self.path.with_name(self.path.name + extra))
        # One connection shared by FastAPI's worker threads, used under a lock: SQLite serialises writers anyway.
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA secure_delete=ON")  # what is deleted (an old token, a replaced link) is zeroed
            self._digest_old_tokens()
            self._create_tables()
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

    def _create_tables(self) -> None:
        for statement in SCHEMA.split(";"):
            if statement.strip():
                self.db.execute(statement)

    def _has_tokens(self) -> bool:
        return "token" in {row["name"] for row in self.db.execute("PRAGMA table_info(raters)")}

    def _digest_old_tokens(self) -> None:
        """A store written before only digests were kept has its raters' tokens in `raters.token`: they become
        digests in `links` (each rater's link keeps working), in one transaction, and the file is rewritten (VACUUM)
        and the WAL emptied, so no copy of a token stays in votes.sqlite or votes.sqlite-wal."""
        if not self._has_tokens():  # a new store, or one converted before: nothing written (a reader may read only)
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            if not self._has_tokens():  # another process converted it meanwhile
                self.db.execute("ROLLBACK")
                return
            rows = self.db.execute("SELECT token, name, created FROM raters").fetchall()
            self.db.execute("ALTER TABLE raters RENAME TO raters_with_tokens")
            self._create_tables()  # statement by statement: executescript would commit the transaction first
            self.db.executemany("INSERT INTO raters VALUES (?, ?)", [(r["name"], r["created"]) for r in rows])
            self.db.executemany(
                "INSERT INTO links VALUES (?, ?, ?)", [(link_digest(r["token"]), r["name"], r["created"]) for r in rows]
            )
            self.db.execute("DROP TABLE raters_with_tokens")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        self.db.execute("VACUUM")
        busy = self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        if busy:
            log.warning(
                f"{self.path}: another process has the store open, so its WAL still holds the old link tokens until "
                "it closes"
            )
        log.info(f"{self.path}: the {len(rows)} raters' link tokens are now kept as digests only")

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
    def _link(self, name: str, now: float) -> str:
        token = secrets.token_urlsafe(16)
        self.db.execute("INSERT INTO links VALUES (?, ?, ?)", (link_digest(token), name, now))
        return token

    def add_rater(self, name: str) -> str | None:
        """A new rater's link token (the only time it is seen: the store keeps its digest); None when the name is
        taken (the start page must not hand out someone's key)."""
        name = normal_name(name)
        with self._transaction():
            if self.db.execute("SELECT 1 FROM raters WHERE name = ?", (name,)).fetchone():
                return None
            now = time.time()
            self.db.execute("INSERT INTO raters VALUES (?, ?)", (name, now))
            return self._link(name, now)

    def has_rater(self, name: str) -> bool:
        with self.lock:
            return self.db.execute("SELECT 1 FROM raters WHERE name = ?", (normal_name(name),)).fetchone() is not None

    def new_link(self, name: str, keep_others: bool = False) -> str:
        """A new link token for rater `name` (made a rater if new). Their earlier links stop working, unless
        `keep_others` (a study with open sign-up, where entering the name again continues as that rater)."""
        name = normal_name(name)
        with self._transaction():
            now = time.time()
            if not self.db.execute("SELECT 1 FROM raters WHERE name = ?", (name,)).fetchone():
                self.db.execute("INSERT INTO raters VALUES (?, ?)", (name, now))
            elif not keep_others:
                self.db.execute("DELETE FROM links WHERE rater = ?", (name,))
            return self._link(name, now)

    def rater_name(self, token: str) -> str | None:
        """The rater whose link `token` is; None for an unknown (or replaced) link."""
        with self.lock:
            row = self.db.execute("SELECT rater FROM links WHERE digest = ?", (link_digest(token),)).fetchone()
        return row["rater"] if row else None

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
            write_json(self.held_path, {"votes": self.votes_held}, private=True)

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
