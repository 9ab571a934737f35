"""humaneval under faults (issue 28): who may act as a rater, dealing under simultaneous requests, answers to other
questions, lost or impossible study state, bad requests answered 4xx not 500, and one server per study."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing

import httpx
import pytest
from omegaconf import OmegaConf

from gpt4llm.errors import ConfigError, RecordError
from gpt4llm.humaneval import check_settings, write_report
from gpt4llm.io.study_lock import LockHeld, study_lock
from gpt4llm.rating.humaneval_report import unblind
from gpt4llm.rating.store import VoteStore
from gpt4llm.rating.study import create_study, load_study, open_or_create
from gpt4llm.rating.web import Rating, RatingServer, reachable_host
from helpers.runs import run_cli
from helpers.studies import CRITERIA, lines_until, start_cli, write_responses

ALL_A = dict.fromkeys(CRITERIA, "A")


@pytest.fixture
def responses(tmp_path) -> list[str]:
    return [str(write_responses(tmp_path, "alpha")), str(write_responses(tmp_path, "beta"))]


def serving(study, votes_per_item=None):
    store = VoteStore(study.votes_path)
    return store, RatingServer(Rating(study, store, votes_per_item)).start()


@pytest.fixture
def server(tmp_path, responses):
    store, running = serving(create_study(tmp_path / "study", responses, CRITERIA))
    yield running, httpx.Client(base_url=running.url)
    running.close()
    store.close()


# --- 1: a rater's name is not their key -------------------------------------------------------------------------------
def test_a_known_name_gets_no_token_and_names_are_normalised(server):
    running, client = server
    ann = client.post("/api/raters", json={"name": "ann"}).json()["token"]
    for again in ("ann", " ann ", "ann\n"):
        reply = client.post("/api/raters", json={"name": again})
        assert reply.status_code == 409 and ann not in reply.text
        assert reply.json()["detail"].startswith("the name 'ann' is taken: if it is yours, go on with your own")
    decomposed = unicodedata.normalize("NFD", "José")
    assert decomposed != "José"
    assert client.post("/api/raters", json={"name": "José"}).status_code == 200
    assert client.post("/api/raters", json={"name": decomposed}).status_code == 409  # one name after NFKC
    for blank in ("", "   ", "\t"):
        assert client.post("/api/raters", json={"name": blank}).status_code == 422
    bob = client.post("/api/raters", json={"name": "bob"}).json()["token"]
    assert bob != ann and running.rating.store.rater_name(bob) == "bob"
    assert len(ann) >= 22 and len(bob) >= 22  # 16 random bytes, URL-safe
    # ann's link still works: her items are hers alone
    assert client.get(f"/api/rate/{ann}/items/-1").json()["rater"] == "ann"


def test_open_signup_is_chosen_when_the_study_is_made_and_the_report_says_so(tmp_path, responses, capsys):
    study = open_or_create(tmp_path / "open", responses, CRITERIA, open_signup=True)
    store, running = serving(study)
    client = httpx.Client(base_url=running.url)
    first = client.post("/api/raters", json={"name": "ann"}).json()["token"]
    again = client.post("/api/raters", json={"name": " ann "}).json()["token"]  # the same name resumes: ann again,
    assert again != first and store.rater_name(again) == store.rater_name(first) == "ann"  # on a link of her own,
    assert client.get(f"/api/rate/{first}/items/-1").json()["rater"] == "ann"  # and her first link still works
    running.close()
    with pytest.raises(ConfigError, match=r"open_signup=false: .*open was made with open_signup=true, which it keeps"):
        open_or_create(tmp_path / "open", [], CRITERIA, open_signup=False)
    assert open_or_create(tmp_path / "open", [], CRITERIA).open_signup  # null: as it was made
    assert not create_study(tmp_path / "closed", responses, CRITERIA).open_signup  # closed unless asked
    cfg = OmegaConf.create({"confidence": 0.95, "resamples": 50, "seed": 0, "formats": ["png"]})
    report = write_report(load_study(tmp_path / "open"), store, cfg)
    assert report["signup"].startswith("open: entering a rater's name on the start page continues as that rater")
    assert "Sign-up was open: entering a rater's name" in capsys.readouterr().out
    store.close()


# --- 3: dealing is atomic per rater; a vote names the task it was shown for -------------------------------------------
@pytest.mark.slow
def test_simultaneous_requests_for_a_raters_next_item_get_one_item(server):
    running, client = server
    tokens = [client.post("/api/raters", json={"name": f"r{i}"}).json()["token"] for i in range(40)]

    def ask(token: str) -> tuple:
        with httpx.Client(base_url=running.url) as own:
            reply = own.get(f"/api/rate/{token}/items/-1").json()
        return reply["position"], reply["instruction"], tuple(reply["answers"])  # what the tab shows

    with ThreadPoolExecutor(16) as pool:  # four tabs per rater asking at once
        answers = list(pool.map(ask, [t for t in tokens for _ in range(4)]))
    by_rater = [set(answers[4 * i : 4 * i + 4]) for i in range(len(tokens))]
    assert [len(seen) for seen in by_rater] == [1] * len(tokens)
    assert all(running.rating.store.assigned(running.rating.store.rater_name(t)) != [] for t in tokens)
    assert {len(running.rating.store.assigned(running.rating.store.rater_name(t))) for t in tokens} == {1}


def test_a_vote_for_another_task_than_the_page_showed_is_refused(server):
    running, client = server
    token = client.post("/api/raters", json={"name": "ann"}).json()["token"]
    shown = client.get(f"/api/rate/{token}/items/0").json().get("task")
    other = next(t.index for t in running.rating.study.tasks if t.index != shown)  # another item's task
    reply = client.post(f"/api/rate/{token}/items/0/vote", json={"task": other, "choices": ALL_A})
    assert reply.status_code == 409
    assert reply.json()["detail"] == (
        "item 1 is another item than this page showed (opened twice?): reload the page; nothing was saved"
    )
    assert client.post(f"/api/rate/{token}/items/0/vote", json={"choices": ALL_A}).status_code == 422  # task required
    assert running.rating.store.count_votes() == 0
    assert client.post(f"/api/rate/{token}/items/0/vote", json={"task": shown, "choices": ALL_A}).status_code == 200
    (vote,) = running.rating.store.latest_votes("ann")
    assert vote["task"] == shown


# --- 4: answers to other questions ------------------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["instruction", "input"])
def test_files_that_share_ids_but_not_questions_are_refused(tmp_path, responses, field):
    other = write_responses(tmp_path / "other", "gamma")
    rows = [json.loads(line) for line in other.read_text().splitlines()]
    rows[3][field] = "Something else entirely"
    rows[5][field] = "And this too"
    other.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(RecordError) as caught:
        create_study(tmp_path / "s", [responses[0], str(other)], CRITERIA)
    assert str(caught.value) == (
        f"{other}: id q3 asks another question than {responses[0]} ({field} differs): "
        "compare answers to the same eval set"
    )
    assert not (tmp_path / "s" / "study.json").exists()


# --- 5: lost or impossible study state --------------------------------------------------------------------------------
def vote_once(study, store, rater="ann"):
    task = study.tasks[0]
    store.add_vote(rater, task.index, task.item, study.shown_order(rater, task), ALL_A, "", 1.0)


@pytest.mark.parametrize("loss", ["emptied", "deleted", "fewer"])
def test_a_store_that_lost_its_votes_is_refused_not_an_empty_study(tmp_path, responses, loss):
    study = create_study(tmp_path / "s", responses, CRITERIA)
    store = VoteStore(study.votes_path)
    for rater in ("ann", "bob"):
        vote_once(study, store, rater)
    store.close()
    if loss == "fewer":
        with sqlite3.connect(study.votes_path) as db:
            db.execute("DELETE FROM votes WHERE rater = 'bob'")
        message = r"votes.sqlite: holds 1 votes, but this study's store held 2 .*votes were lost; restore it"
    else:
        for path in tmp_path.glob("s/votes.sqlite*"):
            path.unlink()
        if loss == "emptied":
            study.votes_path.write_bytes(b"")
        state = "empty \\(0 bytes\\)" if loss == "emptied" else "missing"
        message = rf"votes.sqlite: {state}, but this study's store held 2 votes .*restore votes.sqlite"
    with pytest.raises(RecordError, match=message):
        VoteStore(study.votes_path)


def test_a_new_store_and_one_of_a_study_without_votes_open_empty(tmp_path, responses):
    study = create_study(tmp_path / "s", responses, CRITERIA)
    study.votes_path.write_bytes(b"")  # nothing held: a 0-byte file is a new store
    store = VoteStore(study.votes_path)
    assert store.count_votes() == 0
    vote_once(study, store)
    vote_once(study, store)  # a changed vote is a vote held too
    store.close()
    assert json.loads((tmp_path / "s" / "votes_held.json").read_text()) == {"votes": 2}
    assert VoteStore(study.votes_path).count_votes() == 2


def test_a_corrupt_store_or_study_file_is_one_line_naming_the_file(tmp_path, responses):
    study = create_study(tmp_path / "s", responses, CRITERIA)
    study.votes_path.write_bytes(b"this is not sqlite " * 300)
    with pytest.raises(RecordError, match=r"s/votes.sqlite: not a readable SQLite database \(file is not a database"):
        VoteStore(study.votes_path)
    path = tmp_path / "s" / "study.json"
    path.write_text(path.read_text()[:200])
    with pytest.raises(RecordError, match=r"s/study.json: not a readable study file \(.*\): restore it from a backup"):
        load_study(tmp_path / "s")
    path.write_text('{"models": ["a", "b"]}')
    with pytest.raises(RecordError, match=r"study.json: not a study file \(no criteria, items, secret, responses\)"):
        load_study(tmp_path / "s")


def settings(**overrides):
    defaults = {"votes_per_item": None, "confidence": 0.95, "resamples": 2000, "open_signup": None, "raters": []}
    return OmegaConf.create(defaults | overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"votes_per_item": 0}, "votes_per_item=0: a whole number of votes, 1 or more"),
        ({"votes_per_item": -1}, "votes_per_item=-1: a whole number"),
        ({"votes_per_item": 1.5}, "votes_per_item=1.5: a whole number"),
        ({"votes_per_item": True}, "votes_per_item=True: a whole number"),
        ({"confidence": 2}, "confidence=2: the intervals' confidence level, between 0 and 1"),
        ({"confidence": 0}, "confidence=0: the intervals' confidence level"),
        ({"confidence": 1.0}, "confidence=1.0: the intervals' confidence level"),
        ({"resamples": 0}, "resamples=0: a whole number of bootstrap resamples"),
        ({"open_signup": "yes"}, "open_signup=yes: true, false, or null"),
        ({"raters": ["ann", "  "]}, "raters: '  ': a rater's name cannot be blank"),
    ],
)
def test_settings_that_make_an_unratable_study_or_a_nan_report_stop(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_settings(settings(**overrides))
    check_settings(settings(votes_per_item=2, confidence=0.9))


def test_the_cli_stops_on_a_bad_setting_and_on_an_emptied_store_in_one_line(tmp_path, responses):
    study = create_study(tmp_path / "s", responses, CRITERIA)
    store = VoteStore(study.votes_path)
    vote_once(study, store)
    store.close()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    run = [sys.executable, "-m", "gpt4llm.humaneval", f"study={tmp_path / 's'}"]
    proc = subprocess.run(
        [*run, "votes_per_item=1.5"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        "Error: votes_per_item=1.5: a whole number of votes, 1 or more (or null: every rater may rate every item)"
    )
    for path in tmp_path.glob("s/votes.sqlite*"):
        path.unlink()
    study.votes_path.write_bytes(b"")
    proc = subprocess.run([*run, "report=true"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "no votes yet" not in proc.stdout
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"Error: {study.votes_path}: empty (0 bytes), but this study's store held 1 votes")


# --- 5 and 14: requests that used to land on the wrong item or end in a 500 -------------------------------------------
def test_bad_positions_seconds_and_text_are_4xx_naming_the_field(server):
    running, client = server
    token = client.post("/api/raters", json={"name": "ann"}).json()["token"]
    shown = [client.get(f"/api/rate/{token}/items/{k}").json().get("task") for k in range(2)]
    vote = {"task": shown[1], "choices": ALL_A}
    # -1 is "where I left off" for reading only: a vote at -1 must not land on the last item
    reply = client.post(f"/api/rate/{token}/items/-1/vote", json=vote)
    assert reply.status_code == 422 and reply.json()["detail"].startswith("path.position: Input should be greater")
    for position in (-2, -100):
        assert client.get(f"/api/rate/{token}/items/{position}").status_code == 422
        assert client.post(f"/api/rate/{token}/items/{position}/vote", json=vote).status_code == 422
    assert client.get(f"/api/rate/{token}/items/{10**30}").status_code in (404, 422)
    headers = {"Content-Type": "application/json"}
    for seconds in ("NaN", "Infinity", "-1"):
        body = f'{{"task": {shown[0]}, "choices": {json.dumps(ALL_A)}, "seconds": {seconds}}}'
        reply = client.post(f"/api/rate/{token}/items/0/vote", content=body, headers=headers)
        assert reply.status_code == 422 and reply.json()["detail"].startswith("body.seconds: ")
    surrogate = '"ann\\ud800"'
    reply = client.post("/api/raters", content=f'{{"name": {surrogate}}}', headers=headers)
    assert reply.status_code == 422 and reply.json()["detail"].startswith("body.name: Input should be a valid string")
    body = f'{{"task": {shown[0]}, "choices": {json.dumps(ALL_A)}, "comment": {surrogate}}}'
    reply = client.post(f"/api/rate/{token}/items/0/vote", content=body, headers=headers)
    assert reply.status_code == 422 and reply.json()["detail"].startswith(
        "body.comment: Input should be a valid string"
    )
    assert running.rating.store.count_votes() == 0


def test_seconds_an_older_store_holds_as_infinity_are_written_as_null(tmp_path, responses):
    study = create_study(tmp_path / "s", responses, CRITERIA)
    task = study.tasks[0]
    row = {"rater": "ann", "task": 0, "model_a": task.models[0], "model_b": task.models[1], "choices": ALL_A}
    rows = unblind(study, [row | {"seconds": float("inf")}, row | {"seconds": 2.5}])
    assert [r["seconds"] for r in rows] == [None] * 3 + [2.5] * 3


def test_links_of_a_server_on_every_interface_name_a_reachable_address(tmp_path, responses):
    assert reachable_host("127.0.0.1") == "127.0.0.1" and reachable_host("example.org") == "example.org"
    address = reachable_host("0.0.0.0")
    if address is None:
        pytest.skip("this machine has no network address: the links say to replace 0.0.0.0")
    study = create_study(tmp_path / "s", responses, CRITERIA)
    store = VoteStore(study.votes_path)
    running = RatingServer(Rating(study, store), host="0.0.0.0").start()
    try:
        assert running.url == f"http://{address}:{running.port}"
        assert httpx.get(running.url + "/health").json() == {"status": "ok"}
    finally:
        running.close()
        store.close()


# --- 9: one server per study ------------------------------------------------------------------------------------------
def test_a_held_lock_stops_a_second_holder_and_a_dead_ones_is_taken_over(tmp_path):
    with study_lock(tmp_path, "server.lock", action="serve this study") as stale:
        assert stale == {}
        holder = json.loads((tmp_path / "server.lock").read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(LockHeld) as caught:
            with study_lock(tmp_path, "server.lock", action="serve this study"):
                pass
        assert str(caught.value).startswith(
            f"cannot serve this study: {tmp_path} is in use by pid {os.getpid()} on {holder['host']}, "
            f"started {holder['started']} ("
        )
    assert (tmp_path / "server.lock").read_text() == ""  # released: nobody is named
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "server.lock").write_text(json.dumps({"pid": dead.pid, "host": "h", "started": "then"}))
    with study_lock(tmp_path, "server.lock") as stale:  # what a SIGKILLed holder left
        assert stale["pid"] == dead.pid
        assert json.loads((tmp_path / "server.lock").read_text())["pid"] == os.getpid()


@pytest.mark.slow
def test_a_second_server_on_a_study_stops_at_once_naming_the_first(tmp_path, responses):
    study_dir = tmp_path / "study"
    first, url = start_cli(tmp_path, f"responses=[{responses[0]},{responses[1]}]", f"study={study_dir}", "host=0.0.0.0")
    try:
        assert "0.0.0.0" not in url or reachable_host("0.0.0.0") is None
        holder = json.loads((study_dir / "server.lock").read_text())
        assert holder["pid"] == first.pid
        started = time.monotonic()
        second = subprocess.run(
            [sys.executable, "-m", "gpt4llm.humaneval", "port=0", f"study={study_dir}"],
            cwd=tmp_path,
            env=dict(os.environ, HF_HUB_OFFLINE="1"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1 and time.monotonic() - started < 30
        assert (
            second.stderr.strip()
            .splitlines()[-1]
            .startswith(
                f"Error: cannot serve this study: {study_dir} is in use by pid {first.pid} on {holder['host']}, "
                f"started {holder['started']} ("
            )
        )
        assert "Raters start at" not in second.stdout
    finally:
        first.send_signal(signal.SIGKILL)  # a killed server leaves its lock file behind: the next one takes it over
        first.wait(timeout=30)
    third, _ = start_cli(tmp_path, f"study={study_dir}")
    try:
        assert json.loads((study_dir / "server.lock").read_text())["pid"] == third.pid
    finally:
        third.send_signal(signal.SIGTERM)
        third.wait(timeout=30)
    assert (study_dir / "server.lock").read_text() == ""


# --- round 4, 12: look-alike names, what votes.sqlite gives away, who can read the study's files ---------------------
LOOK_ALIKES = [
    "ann\u200b",  # zero-width space
    "\u200ban\u200cn\u200d",  # zero-width space, non-joiner, joiner
    "an\u2060n",  # word joiner
    "\ufeffann",  # byte-order mark
    "\u202eann\u202c",  # right-to-left override ... pop
    "\u2066ann\u2069",  # left-to-right isolate ... pop
    "an\u00adn",  # soft hyphen
    "ann\ufe0f",  # variation selector
    "ａｎｎ",  # full-width
    "\u3000ann\u00a0",  # ideographic and no-break spaces
]


def test_names_that_look_the_same_are_the_same_name(server):
    running, client = server
    ann = client.post("/api/raters", json={"name": "ann"}).json()["token"]
    for look_alike in LOOK_ALIKES:
        reply = client.post("/api/raters", json={"name": look_alike})
        assert reply.status_code == 409, look_alike.encode("unicode_escape")
        assert reply.json()["detail"].startswith("the name 'ann' is taken: ") and ann not in reply.text
    assert client.post("/api/raters", json={"name": "ann  lee"}).status_code == 200
    reply = client.post("/api/raters", json={"name": " ann\t\u200b lee "})  # whitespace runs are one space
    assert reply.status_code == 409 and reply.json()["detail"].startswith("the name 'ann lee' is taken")
    for blank in ("\u200b", "\ufeff \u2060", "\u202e\u202c\t"):  # nothing visible: blank
        reply = client.post("/api/raters", json={"name": blank})
        assert reply.status_code == 422 and "a rater's name cannot be blank" in reply.text
    with pytest.raises(ConfigError, match=r"raters: '\\u200b': a rater's name cannot be blank"):
        check_settings(settings(raters=["bob", "\u200b"]))
    with sqlite3.connect(running.rating.study.votes_path) as db:
        assert [name for (name,) in db.execute("SELECT name FROM raters ORDER BY name")] == ["ann", "ann lee"]


def test_votes_sqlite_holds_no_rater_link(server):
    running, client = server
    token = client.post("/api/raters", json={"name": "ann"}).json()["token"]
    task = client.get(f"/api/rate/{token}/items/0").json()["task"]
    assert client.post(f"/api/rate/{token}/items/0/vote", json={"task": task, "choices": ALL_A}).status_code == 200
    directory = running.rating.study.directory
    wal = directory / "votes.sqlite-wal"
    assert wal.stat().st_size > 0  # the vote is in the WAL: the server still runs
    for path in (directory / "votes.sqlite", wal, *directory.rglob("*")):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
    with sqlite3.connect(directory / "votes.sqlite") as db:  # what someone who can read the store learns
        kept = [row for row in db.execute("SELECT * FROM links")]
    assert len(kept) == 1 and kept[0][1] == "ann"
    assert client.get(f"/api/rate/{kept[0][0]}/items/-1").status_code == 404  # a digest is no link
    assert client.get(f"/api/rate/{token}/items/-1").json()["rated"] == 1  # the link itself still is


def test_a_store_from_before_digests_keeps_its_links_but_no_longer_the_tokens(tmp_path, responses):
    study = create_study(tmp_path / "s", responses, CRITERIA)
    token = "an-old-token-of-22-chars"
    with closing(sqlite3.connect(study.votes_path)) as db:  # the layout a store had when it kept the tokens
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE raters (token TEXT PRIMARY KEY, name TEXT UNIQUE NOT NULL, created REAL NOT NULL)")
        db.execute("INSERT INTO raters VALUES (?, 'ann', 1.0)", (token,))
        db.commit()
    study.votes_path.chmod(0o644)
    assert token.encode() in study.votes_path.read_bytes()
    store = VoteStore(study.votes_path)
    vote_once(study, store)
    try:
        assert store.rater_name(token) == "ann" and store.add_rater("ann") is None
        for path in tmp_path.glob("s/votes.sqlite*"):
            assert token.encode() not in path.read_bytes(), path
            assert path.stat().st_mode & 0o777 == 0o600, path
    finally:
        store.close()


@pytest.fixture
def umask_022():
    before = os.umask(0o022)
    yield
    os.umask(before)


def modes(directory) -> dict[str, int]:
    """Every path in `directory` (and itself, as '.') with its permission bits."""
    paths = [directory, *directory.rglob("*")]
    return {str(path.relative_to(directory)): path.stat().st_mode & 0o777 for path in paths}


def test_the_studys_files_are_the_owners_alone_under_umask_022(tmp_path, responses, umask_022):
    study = open_or_create(tmp_path / "logs" / "study", responses, CRITERIA)
    store = VoteStore(study.votes_path)
    vote_once(study, store)
    cfg = OmegaConf.create({"confidence": 0.95, "resamples": 50, "seed": 0, "formats": ["png"]})
    write_report(study, store, cfg)
    found = modes(study.directory)
    store.close()
    assert {"votes.sqlite", "votes.sqlite-wal", "votes.sqlite-shm", "votes_held.json", "study.json"} < set(found)
    assert {"humaneval_report.json", "votes_unblinded.jsonl", "pie_alpha_vs_beta.png"} < set(found)
    assert found == {name: 0o700 if name == "." else 0o600 for name in found}
    assert (tmp_path / "logs").stat().st_mode & 0o777 == 0o755  # only the study's own directory is closed


@pytest.mark.slow
def test_the_command_prints_a_link_once_and_keeps_every_file_owner_only(tmp_path, responses, umask_022):
    study_dir = tmp_path / "study"
    proc, url = start_cli(tmp_path, f"responses=[{responses[0]},{responses[1]}]", f"study={study_dir}", "raters=[ann]")
    try:
        (line,) = [line for line in lines_until(proc, "Sign-up:") if line.startswith("  ann: ")]
        token = line.split("/rate/", 1)[1]
        task = httpx.get(f"{url}/api/rate/{token}/items/0").json()["task"]
        assert httpx.post(f"{url}/api/rate/{token}/items/0/vote", json={"task": task, "choices": ALL_A}).is_success
        running = modes(study_dir)  # with the server's lock, WAL and shared memory, and Hydra's session files
        assert {"server.lock", "votes.sqlite-wal", "votes.sqlite-shm"} < set(running)
        assert any(name.endswith("humaneval.log") for name in running)
        assert running == {n: 0o700 if (study_dir / n).is_dir() else 0o600 for n in running}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    again, url = start_cli(tmp_path, f"study={study_dir}", "raters=[ann,bob]")
    try:
        printed = [line for line in lines_until(again, "Sign-up:") if line.startswith(("  ann: ", "  bob: "))]
        assert printed[0] == (
            "  ann: added before; their link was printed then (only its digest is kept). If it is lost, "
            "new_links=[ann] prints a new one and ends the old"
        )
        assert printed[1].startswith(f"  bob: {url}/rate/") and len(printed) == 2
        assert httpx.get(f"{url}/api/rate/{token}/items/-1").json()["rated"] == 1  # ann goes on with her link
    finally:
        again.send_signal(signal.SIGTERM)
        again.wait(timeout=30)
    run_cli("gpt4llm.humaneval", [f"study={study_dir}", "report=true", "resamples=50", "formats=[png]"], cwd=tmp_path)
    found = modes(study_dir)
    assert "humaneval_report.json" in found and "pie_alpha_vs_beta.png" in found
    assert found == {n: 0o700 if (study_dir / n).is_dir() else 0o600 for n in found}
    for path in study_dir.rglob("*"):
        assert not path.is_file() or token.encode() not in path.read_bytes(), path


def test_a_new_link_for_a_rater_ends_the_old_one_and_keeps_their_votes(tmp_path, responses):
    from gpt4llm.humaneval import rater_links

    study = create_study(tmp_path / "s", responses, CRITERIA)
    store, running = serving(study)
    client = httpx.Client(base_url=running.url)
    try:
        first = rater_links(store, running.url, ["ann", "bob"], [])
        assert [line.split(": ", 1)[0] for line in first] == ["ann", "bob"]
        ann, bob = (line.split("/rate/", 1)[1] for line in first)
        task = client.get(f"/api/rate/{ann}/items/0").json()["task"]
        assert client.post(f"/api/rate/{ann}/items/0/vote", json={"task": task, "choices": ALL_A}).is_success
        again = rater_links(store, running.url, ["ann", "ａｎｎ"], [])  # started again: no link to show
        assert again == [
            "ann: added before; their link was printed then (only its digest is kept). If it is lost, "
            "new_links=[ann] prints a new one and ends the old"
        ]
        (renewed, new_rater) = rater_links(store, running.url, ["ann"], ["ann\u200b", "cy"])
        assert renewed.startswith(f"ann: {running.url}/rate/")
        assert renewed.endswith(" (a new link: the one given before no longer works)")
        assert new_rater.startswith(f"cy: {running.url}/rate/") and "(a new link" not in new_rater
        new = renewed.split("/rate/", 1)[1].split(" ", 1)[0]
        assert new != ann and store.rater_name(ann) is None and store.rater_name(new) == "ann"
        assert client.get(f"/api/rate/{ann}/items/-1").status_code == 404  # the old link is ended
        assert client.get(f"/rate/{ann}", follow_redirects=False).status_code == 307
        item = client.get(f"/api/rate/{new}/items/-1").json()  # the new one goes on where ann was
        assert item["rater"] == "ann" and item["rated"] == 1 and item["position"] == 1
        assert store.rater_name(bob) == "bob"  # the others' links are untouched
        rater_links(store, running.url, ["ann lee"], [])
        (quoted,) = rater_links(store, running.url, ["ann lee"], [])  # the setting to give, quoted for the shell
        assert quoted.endswith(""" 'new_links=["ann lee"]' prints a new one and ends the old""")
    finally:
        running.close()
        store.close()
    with pytest.raises(ConfigError, match=r"new_links: '\\u2060': a rater's name cannot be blank"):
        check_settings(settings(new_links=["\u2060"]))
