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
from helpers.studies import CRITERIA, start_cli, write_responses

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
    assert client.post("/api/raters", json={"name": decomposed}).status_code == 409  # one name after NFC
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
    assert client.post("/api/raters", json={"name": " ann "}).json()["token"] == first  # the same name resumes
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
