"""A blind pairwise study (the paper's human evaluation, Figure 3): the items (instruction, input, each model's answer)
and the comparisons raters make, fixed in `<study>/study.json` when the study is created (owner-only, 0600, in a
0700 directory: gpt4llm.rating.private).

A task is one item compared for one pair of models (with two models, one task per item). Which answer a rater sees
as A is decided per rater and task from the study's secret, so it cannot be guessed from the page, and is recorded
with every vote.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gpt4llm.data.sources import file_digest
from gpt4llm.errors import ConfigError, MissingFileError, RecordError
from gpt4llm.io.json_files import write_json
from gpt4llm.rating.private import private_directory

STUDY_FILE = "study.json"
VOTES_FILE = "votes.sqlite"


@dataclass(frozen=True)
class Task:
    index: int
    item: str  # the eval set's id
    models: tuple[str, str]  # (model, opponent), as the report names them


class Study:
    def __init__(self, directory: Path, spec: dict[str, Any]):
        self.directory = directory
        self.spec = spec
        self.models: list[str] = spec["models"]
        self.criteria: dict[str, str] = spec["criteria"]
        self.items: dict[str, dict] = {item["id"]: item for item in spec["items"]}
        # Open sign-up: the start page hands an existing rater's link to whoever enters their name (studies made
        # before this was a choice were open that way; they are closed now unless remade).
        self.open_signup: bool = bool(spec.get("open_signup", False))
        pairs = list(itertools.combinations(self.models, 2))
        each = [(item["id"], pair) for item in spec["items"] for pair in pairs]
        self.tasks = [Task(k, item_id, pair) for k, (item_id, pair) in enumerate(each)]

    @property
    def votes_path(self) -> Path:
        return self.directory / VOTES_FILE

    def shown_order(self, rater: str, task: Task) -> tuple[str, str]:
        """The models shown as (A, B) to `rater` for `task`: a coin flip seeded by the study's secret."""
        digest = hashlib.sha256(f"{self.spec['secret']}|{rater}|{task.index}".encode()).digest()
        return task.models[::-1] if digest[0] & 1 else task.models

    def preference(self, rater: str, task: Task) -> int:
        """A rater's fixed random rank for a task, breaking ties between equally-rated tasks: raters take the
        items in different orders."""
        digest = hashlib.sha256(f"{self.spec['secret']}|order|{rater}|{task.index}".encode()).digest()
        return int.from_bytes(digest[:8], "big")


def load_study(directory: str | Path) -> Study:
    directory = Path(directory)
    path = directory / STUDY_FILE
    if not path.is_file():
        raise MissingFileError(
            f"{path}: no such study (create one with responses=[A/responses.jsonl,B/responses.jsonl])"
        )
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecordError(f"{path}: not a readable study file ({err}): restore it from a backup") from None
    # Checked here, so a damaged study stops at start and not in the middle of a rater's request.
    keys = ("models", "criteria", "items", "secret", "responses")
    missing = [key for key in keys if key not in spec] if isinstance(spec, dict) else list(keys)
    if missing:
        raise RecordError(f"{path}: not a study file (no {', '.join(missing)}): restore it from a backup")
    return Study(directory, spec)


def create_study(
    directory: str | Path,
    responses: list[str],
    criteria: dict[str, str],
    names: list[str] | None = None,
    open_signup: bool = False,
) -> Study:
    """Reads two or more responses files answering the same eval set and writes the study. Files of different eval
    sets (other ids, or the same ids asking other questions) are refused, naming the ids."""
    from gpt4llm.evaluation.responses import read_responses

    directory = Path(directory)
    if len(responses) < 2:
        raise RecordError(f"responses: {len(responses)} file(s) given; a pairwise study needs two or more")
    answers = [read_responses(path) for path in responses]
    models = list(names) if names else [rows[0]["model"] for rows in answers]
    if len(models) != len(responses):
        raise RecordError(f"names: {len(models)} names for {len(responses)} responses files")
    if len(set(models)) != len(models):
        raise RecordError(
            f"responses: two files name their model the same ({models}); set names=[...] to tell them apart"
        )
    sets = {path: rows[0].get("eval") for path, rows in zip(responses, answers)}  # generate's lines name their eval set
    if len({name for name in sets.values() if name}) > 1:
        raise RecordError(f"responses: answers to different eval sets ({sets}); compare answers to the same set")
    first_ids = [str(row["id"]) for row in answers[0]]
    for path, rows in zip(responses[1:], answers[1:]):
        ids = {str(row["id"]) for row in rows}
        missing, extra = [i for i in first_ids if i not in ids], sorted(ids - set(first_ids))
        if missing or extra:
            raise RecordError(
                f"{path}: not the same questions as {responses[0]} ({len(missing)} ids missing, e.g. {missing[:3]}; "
                f"{len(extra)} extra, e.g. {extra[:3]}): compare answers to the same eval set"
            )
    by_model = [{str(row["id"]): row for row in rows} for rows in answers]
    items = []
    for item_id in first_ids:
        rows = [table[item_id] for table in by_model]
        given = [(path, row) for path, row in zip(responses, rows) if "instruction" in row]
        if not given:
            raise RecordError(f"id {item_id}: no file gives its instruction (gpt4llm.generate's responses.jsonl do)")
        (source_path, source), *others = given
        for path, row in others:
            # Shared ids are not enough: a study must not show A's question beside B's answer to another one.
            for field in ("instruction", "input"):
                if _question(row, field) != _question(source, field):
                    raise RecordError(
                        f"{path}: id {item_id} asks another question than {source_path} ({field} differs): "
                        "compare answers to the same eval set"
                    )
        items.append(
            {
                "id": item_id,
                "instruction": source["instruction"],
                "input": source.get("input") or "",
                "answers": {model: row["response"] for model, row in zip(models, rows)},
            }
        )
    spec = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "responses": [
            {"path": str(Path(p).resolve()), "model": m, "sha256": _sha256(Path(p))} for p, m in zip(responses, models)
        ],
        "models": models,
        "criteria": dict(criteria),
        "items": items,
        "secret": secrets.token_hex(16),  # the A/B order's seed: never sent to a browser
        "open_signup": bool(open_signup),
    }
    private_directory(directory)  # 0700 before anything is in it: the study's files are its owner's alone
    write_json(directory / STUDY_FILE, spec, indent=1, private=True)  # 0600: it holds the secret
    return Study(directory, spec)


def open_or_create(
    directory: str | Path,
    responses: list[str],
    criteria: dict[str, str],
    names: list[str] | None = None,
    open_signup: bool | None = None,
) -> Study:
    """The study in `directory`; created from `responses` when it has none. An existing study given other responses
    files, or the other sign-up than it was made with, is refused, not silently mixed."""
    directory = Path(directory)
    if not (directory / STUDY_FILE).is_file():
        if not responses:
            raise MissingFileError(f"{directory / STUDY_FILE}: no such study, and no responses=[...] to create it from")
        return create_study(directory, responses, criteria, names, open_signup=bool(open_signup))
    study = load_study(directory)
    if open_signup is not None and bool(open_signup) != study.open_signup:
        raise ConfigError(
            f"open_signup={str(bool(open_signup)).lower()}: {directory} was made with "
            f"open_signup={str(study.open_signup).lower()}, which it keeps; leave open_signup out, or start a new "
            "study with study=<new dir>"
        )
    given = {_sha256(Path(p)) for p in responses}
    if given and given != {r["sha256"] for r in study.spec["responses"]}:
        raise RecordError(
            f"{directory}: this study was made from other responses files "
            f"({', '.join(r['path'] for r in study.spec['responses'])}); start a new study with study=<new dir>"
        )
    return study


def _sha256(path: Path) -> str:
    if not path.is_file():
        raise MissingFileError(f"{path}: no such responses file (write one with python -m gpt4llm.generate)")
    return file_digest(path, "sha256")


def _question(row: dict, field: str) -> str:
    return str(row.get(field) or "").strip()  # no input and an empty one are the same question
