"""The blind pairwise human evaluation: study, store, dealing, un-blinding, statistics, the page in a real browser."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import httpx
import numpy as np
import pytest

from gpt4llm.errors import RecordError
from gpt4llm.rating.humaneval_report import build_report, cohen_pairs, fleiss, fraction_interval
from gpt4llm.rating.store import VoteStore
from gpt4llm.rating.study import create_study, open_or_create
from gpt4llm.rating.web import Rating, RatingServer, Vote
from helpers.runs import run_cli
from helpers.studies import CRITERIA, ITEMS, start_cli, write_responses


@pytest.fixture
def responses(tmp_path) -> list[Path]:
    return [write_responses(tmp_path, "alpha"), write_responses(tmp_path, "beta")]


# --- the study ---------------------------------------------------------------------------------------------------
def test_study_refuses_answers_to_other_questions_and_look_alike_models(tmp_path, responses):
    other = write_responses(tmp_path / "other", "gamma", ids=range(1, ITEMS + 1))
    with pytest.raises(
        RecordError, match=r"gamma/responses.jsonl: not the same questions .*1 ids missing, e\.g\. \['q0'\]"
    ):
        create_study(tmp_path / "s1", [str(responses[0]), str(other)], CRITERIA)
    tagged = []
    for model, eval_set in (("gamma", "vicuna80"), ("delta", "user_oriented252")):
        path = write_responses(tmp_path / "sets", model)
        path.write_text(path.read_text().replace(f'"model": "{model}"', f'"model": "{model}", "eval": "{eval_set}"'))
        tagged.append(str(path))
    with pytest.raises(RecordError, match="answers to different eval sets"):
        create_study(tmp_path / "s0", tagged, CRITERIA)
    twin = write_responses(tmp_path / "twin", "alpha")
    with pytest.raises(RecordError, match="name their model the same"):
        create_study(tmp_path / "s2", [str(responses[0]), str(twin)], CRITERIA)
    study = create_study(tmp_path / "s3", [str(responses[0]), str(twin)], CRITERIA, names=["a1", "a2"])
    assert study.models == ["a1", "a2"] and len(study.tasks) == ITEMS
    with pytest.raises(RecordError, match="made from other responses files"):
        open_or_create(tmp_path / "s3", [str(responses[0]), str(responses[1])], CRITERIA)
    assert open_or_create(tmp_path / "s3", [], CRITERIA).spec["secret"] == study.spec["secret"]


def test_three_models_make_every_pair_a_task(tmp_path, responses):
    third = write_responses(tmp_path, "gamma")
    study = create_study(tmp_path / "s", [str(p) for p in (*responses, third)], CRITERIA)
    assert len(study.tasks) == 3 * ITEMS
    assert {t.models for t in study.tasks} == {("alpha", "beta"), ("alpha", "gamma"), ("beta", "gamma")}


def test_orders_are_random_per_rater_and_item_but_fixed(tmp_path, responses):
    study = create_study(tmp_path / "s", [str(p) for p in responses], CRITERIA)
    orders = {(r, t.index): study.shown_order(r, t) for r in ("ann", "bob", "cy") for t in study.tasks}
    assert all(study.shown_order(r, study.tasks[t]) == o for (r, t), o in orders.items())
    flipped = sum(o == ("beta", "alpha") for o in orders.values())
    assert 0 < flipped < len(orders)  # both orders occur (18 coin flips)


# --- dealing and storing ---------------------------------------------------------------------------------------------
def rate(client: httpx.Client, token: str, choices: dict[str, str]) -> dict:
    item = client.get(f"/api/rate/{token}/items/-1").json()
    if item["finished"]:
        return item
    vote = {"task": item["task"], "choices": choices, "seconds": 2.0}
    reply = client.post(f"/api/rate/{token}/items/{item['position']}/vote", json=vote)
    assert reply.status_code == 200, reply.text
    return item


@pytest.fixture
def server(tmp_path, responses):
    study = create_study(tmp_path / "study", [str(p) for p in responses], CRITERIA)
    store = VoteStore(study.votes_path)
    running = RatingServer(Rating(study, store, votes_per_item=2)).start()
    yield running, httpx.Client(base_url=running.url)
    running.close()
    store.close()


def test_items_are_dealt_evenly_never_twice_and_stop_at_the_quota(server):
    running, client = server
    tokens = {name: client.post("/api/raters", json={"name": name}).json()["token"] for name in ("ann", "bob", "cy")}
    all_a = dict.fromkeys(CRITERIA, "A")
    seen = {name: [] for name in tokens}
    for _ in range(ITEMS):  # in turns: each round, three raters take three items
        for name, token in tokens.items():
            item = rate(client, token, all_a)
            if not item["finished"]:
                seen[name].append(item["answers"][0].split(" on ")[1][:2])
    assert all(len(items) == len(set(items)) for items in seen.values())  # never the same item twice
    shown = [i for items in seen.values() for i in items]
    assert sorted(shown) == sorted([f"q{i}" for i in range(ITEMS)] * 2)  # every item exactly twice (votes_per_item)
    first_round = [seen[name][0] for name in tokens] + [seen[name][1] for name in tokens]
    assert len(set(first_round)) == ITEMS  # every item got a first rater before any got a second
    finished = client.get(f"/api/rate/{tokens['ann']}/items/-1").json()
    assert finished["finished"] and finished["rated"] == len(seen["ann"])
    again = client.post("/api/raters", json={"name": " ann "})  # a name is not a key: ann goes on with her link
    assert again.status_code == 409 and tokens["ann"] not in again.text


def test_bad_votes_and_links_are_refused(server):
    running, client = server
    token = client.post("/api/raters", json={"name": "ann"}).json()["token"]
    task = client.get(f"/api/rate/{token}/items/0").json()["task"]
    for choices in ({"helpfulness": "A"}, dict.fromkeys(CRITERIA, "C")):
        reply = client.post(f"/api/rate/{token}/items/0/vote", json={"task": task, "choices": choices})
        assert reply.status_code == 422 and "choices" in reply.text
    vote = {"task": task, "choices": dict.fromkeys(CRITERIA, "A")}
    assert client.post(f"/api/rate/{token}/items/3/vote", json=vote).status_code == 404
    assert client.get("/api/rate/nobody/items/0").status_code == 404
    assert client.get("/rate/nobody", follow_redirects=False).status_code == 307
    assert client.post("/api/raters", json={"name": ""}).status_code == 422
    assert running.rating.store.count_votes() == 0


def test_the_finished_page_says_all_items_are_rated_not_item_5_of_4(tmp_path):
    paths = [write_responses(tmp_path, model, ids=range(4)) for model in ("alpha", "beta")]
    study = create_study(tmp_path / "s", [str(p) for p in paths], CRITERIA)
    store = VoteStore(study.votes_path)
    rating, token = Rating(study, store), store.add_rater("ann")
    assert rating.item(token, -1)["heading"] == "ann · item 1 of 4 · 0 rated"
    for position in range(4):
        task = rating.item(token, position)["task"]
        rating.vote(token, position, Vote(task=task, choices=dict.fromkeys(CRITERIA, "tie")))
    finished = rating.item(token, -1)
    assert finished["finished"] and finished["position"] == 4  # one past the last item: the page used to show it
    assert finished["heading"] == "ann · all items rated · 4 of 4 rated"
    assert finished["message"] == "You rated 4 items. You can close this page."
    store.close()


def test_a_rater_left_without_items_by_the_quota_is_told_so_in_the_singular(tmp_path):
    paths = [write_responses(tmp_path, model, ids=range(2)) for model in ("alpha", "beta")]
    study = create_study(tmp_path / "s", [str(p) for p in paths], CRITERIA)
    store = VoteStore(study.votes_path)
    rating = Rating(study, store, votes_per_item=1)
    ann, bob = store.add_rater("ann"), store.add_rater("bob")
    rating.item(bob, 0)  # bob is shown one item, ann the other: each has had its one rater
    task = rating.item(ann, 0)["task"]
    rating.vote(ann, 0, Vote(task=task, choices=dict.fromkeys(CRITERIA, "A")))
    finished = rating.item(ann, -1)
    assert finished["heading"] == "ann · no more items for you: the rest went to other raters · 1 of 2 rated"
    assert finished["message"] == "You rated 1 item. You can close this page."
    store.close()


def test_the_report_says_1_rater_and_1_vote(tmp_path, responses, capsys):
    from omegaconf import OmegaConf

    from gpt4llm.humaneval import write_report

    study = create_study(tmp_path / "s", [str(p) for p in responses], CRITERIA)
    store = VoteStore(study.votes_path)
    task = study.tasks[0]
    store.add_vote("ann", task.index, task.item, study.shown_order("ann", task), dict.fromkeys(CRITERIA, "tie"), "", 1)
    cfg = OmegaConf.create({"confidence": 0.95, "resamples": 100, "seed": 0, "formats": ["png"]})
    write_report(study, store, cfg)
    lines = capsys.readouterr().out.splitlines()
    assert lines[2:6] == [
        "alpha vs beta (1 rater)",
        "  helpfulness: win 0.0%  lose 0.0%  tie 100.0% (1 vote)",
        "  honesty: win 0.0%  lose 0.0%  tie 100.0% (1 vote)",
        "  harmlessness: win 0.0%  lose 0.0%  tie 100.0% (1 vote)",
    ]
    store.close()


def test_a_changed_vote_counts_once_as_its_latest(tmp_path, responses):
    study = create_study(tmp_path / "s", [str(p) for p in responses], CRITERIA)
    store = VoteStore(study.votes_path)
    task = study.tasks[0]
    shown = study.shown_order("ann", task)
    store.add_vote("ann", task.index, task.item, shown, dict.fromkeys(CRITERIA, "A"), "", 1.0)
    store.add_vote("ann", task.index, task.item, shown, dict.fromkeys(CRITERIA, "B"), "changed my mind", 3.0)
    report = build_report(study, store, resamples=100)
    row = report["comparisons"][0]["criteria"]["honesty"]
    winner = "lose" if shown[1] == "beta" else "win"  # B was shown[1]; the first model is alpha
    assert row["votes"] == 1 and row["counts"][winner] == 1
    store.close()


# --- statistics, against hand computation -----------------------------------------------------------------------------
def test_fleiss_and_cohen_kappa_match_hand_computation():
    # Two raters, four tasks: they agree on three. Fleiss: P = 3/4, Pe = (3/8)^2 + (3/8)^2 + (2/8)^2 = 22/64,
    # kappa = (3/4 - 22/64) / (1 - 22/64) = 13/21. Cohen: marginals (2,1,1)/4 and (1,2,1)/4, pe = 5/16, kappa = 7/11.
    by_task = {0: ["win", "win"], 1: ["win", "lose"], 2: ["tie", "tie"], 3: ["lose", "lose"], 4: ["win"]}
    result = fleiss(by_task)
    assert result["tasks"] == 4 and result["raters_per_task"] == 2
    assert result["kappa"] == pytest.approx(13 / 21)
    by_rater = {
        "ann": {0: "win", 1: "win", 2: "tie", 3: "lose", 4: "win"},
        "bob": {0: "win", 1: "lose", 2: "tie", 3: "lose"},
    }
    (pair,) = cohen_pairs(by_rater)
    assert pair["raters"] == ["ann", "bob"] and pair["tasks"] == 4
    assert pair["kappa"] == pytest.approx(7 / 11) and pair["agreement"] == 0.75
    assert fleiss({0: ["win"], 1: ["tie"]}) is None


def test_bootstrap_interval_has_the_binomial_width_and_resamples_items_not_votes():
    rng = np.random.default_rng(1)
    wins = rng.random(400) < 0.3
    low, high = fraction_interval(wins.astype(float), np.ones(400), 0.95, 2000, 0)
    half_width = 1.96 * np.sqrt(0.3 * 0.7 / 400)  # the normal approximation: 0.045
    assert low < wins.mean() < high and (high - low) / 2 == pytest.approx(half_width, rel=0.15)
    # The same votes as 200 items with two raters who always agree: half the independent evidence, a wider interval.
    pairs = wins[:200].astype(float) * 2
    low2, high2 = fraction_interval(pairs, np.full(200, 2.0), 0.95, 2000, 0)
    assert (high2 - low2) / (high - low) == pytest.approx(np.sqrt(2), rel=0.15)
    assert fraction_interval(np.ones(5), np.ones(5), 0.95, 100, 0) == [1.0, 1.0]


# --- the command, a killed server, and the page in a real browser -----------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def browser_or_skip():
    if CHROMIUM is None:
        pytest.skip("no Chromium: `apt-get install chromium` (the browser test drives Debian's Chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    return sync_playwright


def on_page(page) -> dict:
    """What the rater sees: the item's id, and which model's answer is shown as A and as B."""
    a, b = page.locator("#answer-a").inner_text(), page.locator("#answer-b").inner_text()
    model_of = lambda text: text.split("[", 1)[1].split(" on ")[0]  # noqa: E731
    return {"item": a.split(" on ", 1)[1][:2], "A": model_of(a), "B": model_of(b)}


@pytest.mark.slow
def test_two_raters_in_the_browser_through_a_killed_server(tmp_path, responses):
    sync_playwright = browser_or_skip()
    study_dir = tmp_path / "logs" / "humaneval" / "pilot"
    proc, url = start_cli(tmp_path, f"responses=[{responses[0]},{responses[1]}]", f"study={study_dir}")
    pressed: list[tuple[str, dict, dict]] = []  # (rater, what the page showed, the keys' choices)
    keys = {"helpfulness": ("1", "A"), "honesty": ("5", "tie"), "harmlessness": ("9", "B")}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        phone = browser.new_page(viewport={"width": 390, "height": 844})  # ann rates on a phone-sized screen
        desk = browser.new_page(viewport={"width": 1280, "height": 900})
        pages = {"ann": phone, "bob": desk}
        try:
            for name, page in pages.items():
                page.goto(url + "/")
                page.fill("#name", name)
                page.click("button[type=submit]")
                page.wait_for_url("**/rate/**")
                page.wait_for_selector("#answer-a:not(:empty)")

            def rate_with_keys(name: str) -> None:
                page = pages[name]
                before = page.locator("#progress").inner_text()
                shown = on_page(page)
                for key, _ in keys.values():
                    page.keyboard.press(key)
                page.keyboard.press("Enter")
                page.wait_for_function(
                    "before => document.querySelector('#progress').textContent !== before", arg=before
                )
                pressed.append((name, shown, {c: v for c, (_, v) in keys.items()}))

            # Blind, and text only: no model name, no injected element, the markup shown as typed.
            assert phone.locator("#instruction b, #input img, #input script, #answer-a script").count() == 0
            assert "<script>window.pwned=1</script>" in phone.locator("#answer-a").inner_text()
            assert phone.evaluate("window.pwned === undefined") and phone.title() != "pwned"
            page_text = phone.locator("body").inner_text() + desk.locator("body").inner_text()
            assert "alpha" not in page_text.replace("[alpha on", "").replace("[beta on", "")
            assert "beta" not in page_text.replace("[alpha on", "").replace("[beta on", "")
            # Phone-sized: the answers stack; on the desk they sit side by side.
            a_box, b_box = phone.locator("#answer-a").bounding_box(), phone.locator("#answer-b").bounding_box()
            assert b_box["y"] > a_box["y"] + a_box["height"]
            a_box, b_box = desk.locator("#answer-a").bounding_box(), desk.locator("#answer-b").bounding_box()
            assert b_box["x"] > a_box["x"] + a_box["width"] and abs(b_box["y"] - a_box["y"]) < 2

            rate_with_keys("ann")
            rate_with_keys("bob")
            # bob clicks instead of typing: B, B, tie
            clicks = {"helpfulness": "B", "honesty": "B", "harmlessness": "tie"}
            shown = on_page(desk)
            for criterion, choice in clicks.items():
                desk.click(f"button[data-criterion={criterion}][data-choice={choice}]")
            assert desk.locator("button[aria-pressed=true]").count() == 3
            desk.click("#next")
            desk.wait_for_selector("text=item 3 of 6")
            pressed.append(("bob", shown, clicks))
            rate_with_keys("ann")
            ann_third = on_page(phone)
            phone.screenshot(path=str(tmp_path / "rating_page.png"))
            desk.screenshot(path=str(os.environ.get("GPT4LLM_SCREENSHOT", tmp_path / "rating_desk.png")))

            proc.send_signal(signal.SIGKILL)  # mid-study: ann is looking at her third item
            proc.wait(timeout=30)
            proc, url2 = start_cli(tmp_path, f"study={study_dir}")
            port = url2.rsplit(":", 1)[1]
            for page in pages.values():  # the raters' links, on the new server's port
                page.goto(page.url.split("#")[0].replace(url.rsplit(":", 1)[1], port, 1))
                page.wait_for_selector("#answer-a:not(:empty)")
            assert "item 3 of 6 · 2 rated" in phone.locator("#progress").inner_text()
            assert on_page(phone) == ann_third  # the same item, the same order after the restart
            rate_with_keys("ann")
            phone.keyboard.press("ArrowLeft")  # back to item 3: her vote is shown, and can be left as it is
            phone.wait_for_selector("text=item 3 of 6")
            assert phone.locator("button[aria-pressed=true]").count() == 3
            assert (
                phone.locator("button[data-criterion=honesty][data-choice=tie]").get_attribute("aria-pressed") == "true"
            )
            phone.keyboard.press("ArrowRight")  # on to her fourth item, and through the last: the page says she is done
            phone.wait_for_selector("text=item 4 of 6")
            for _ in range(3):
                rate_with_keys("ann")
            assert phone.locator("#progress").inner_text() == "ann · all items rated · 6 of 6 rated"
            assert phone.locator("#finished-text").inner_text() == "You rated 6 items. You can close this page."
        finally:
            browser.close()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)

    run_cli("gpt4llm.humaneval", [f"study={study_dir}", "report=true", "resamples=200", "formats=[png]"], cwd=tmp_path)
    report = json.loads((study_dir / "humaneval_report.json").read_text())
    # Un-blinded by hand from what each page showed and what was pressed: alpha is the model, beta the opponent.
    expected = {c: {"win": 0, "lose": 0, "tie": 0} for c in CRITERIA}
    for _, shown, choices in pressed:
        for criterion, choice in choices.items():
            outcome = "tie" if choice == "tie" else "win" if shown[choice] == "alpha" else "lose"
            expected[criterion][outcome] += 1
    (comparison,) = report["comparisons"]
    assert (comparison["model"], comparison["opponent"]) == ("alpha", "beta")
    assert {c: row["counts"] for c, row in comparison["criteria"].items()} == expected
    assert sum(expected["helpfulness"].values()) == 8 and comparison["raters"] == ["ann", "bob"]
    votes = [json.loads(line) for line in (study_dir / "votes_unblinded.jsonl").read_text().splitlines()]
    assert {(v["rater"], v["item"]) for v in votes} == {(n, s["item"]) for n, s, _ in pressed}
    assert all(v["seconds"] > 0 for v in votes)
    assert (study_dir / "pie_alpha_vs_beta.png").is_file() and (study_dir / "bar_hhh_alpha_vs_beta.png").is_file()
