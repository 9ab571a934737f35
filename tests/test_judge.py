"""The chat client and the GPT-4 judge against a real HTTP server on 127.0.0.1 (no mocked client): retries on 429,
5xx and timeouts, the on-disk cache (a rerun sends nothing), unparsable replies, and the key never written."""

from __future__ import annotations

import json
import re

import pytest

from gpt4llm.evaluation.judge import fastchat_scores, judge, parse_scores, reader
from gpt4llm.evaluation.judge_prompts import FastChatReviewers
from gpt4llm.inference.openai_client import ChatClient, ChatError
from helpers.configs import CONF, SHARED_DATA
from helpers.fake_servers import ChatServer

KEY = "sk-test-NEVER-WRITE-THIS-0123456789"


@pytest.fixture
def server(loopback):
    return lambda **kwargs: loopback(ChatServer, **kwargs)


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", KEY)
    return KEY


SYSTEM = "You check answers."
TEMPLATE = (
    "[Question]\n{question}\n\n[The Start of Assistant 1's Answer]\n{answer_1}\n\n[The End of Assistant 1's Answer]\n\n"
    "[The Start of Assistant 2's Answer]\n{answer_2}\n\n[The End of Assistant 2's Answer]\n\n[System]\n{prompt}\n\n"
)


def write_fastchat_files(directory):
    """Files in the layout of FastChat's prompt.jsonl and reviewer.jsonl, with our own instruction texts."""
    texts = {
        "general": "Rate both; two scores on the first line.",
        "coding": "Review the code; two scores first.",
        "math": "Solve it first. Finally, please output a Python tuple containing two numerical scores.",
    }
    prompts = [
        {
            "prompt_id": i,
            "system_prompt": SYSTEM,
            "prompt_template": TEMPLATE,
            "defaults": {"prompt": text},
            "description": cat,
            "category": cat,
        }
        for i, (cat, text) in enumerate(texts.items(), 1)
    ]
    reviewers = [
        {"reviewer_id": f"r-{cat}", "prompt_id": i, "metadata": {}, "description": cat, "category": cat}
        for i, cat in enumerate(texts, 1)
    ]
    for name, rows in (("prompt.jsonl", prompts), ("reviewer.jsonl", reviewers)):
        (directory / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory / "prompt.jsonl", directory / "reviewer.jsonl"


@pytest.fixture
def reviewers(tmp_path):
    return FastChatReviewers.from_files(*write_fastchat_files(tmp_path))


def client(srv, tmp_path, **kwargs) -> ChatClient:
    options = dict(
        api_key_env="JUDGE_TEST_KEY", cache_path=tmp_path / "cache.jsonl", timeout=1.0, backoff=0.01, max_retries=3
    )
    return ChatClient(srv.base_url, "judge-model", **(options | kwargs))


def test_chat_sends_key_returns_result_and_caches(server, key, tmp_path):
    srv = server(reply=lambda r: "hello " + r["messages"][-1]["content"])
    c = client(srv, tmp_path)
    result = c.chat([{"role": "user", "content": "there"}], temperature=0.2, max_tokens=5)
    assert (result.text, result.finish_reason, result.usage["completion_tokens"], result.cached) == (
        "hello there",
        "stop",
        3,
        False,
    )
    assert srv.auth == [f"Bearer {KEY}"]
    assert srv.requests[0] == {
        "model": "judge-model",
        "messages": [{"role": "user", "content": "there"}],
        "temperature": 0.2,
        "max_tokens": 5,
    }

    again = client(srv, tmp_path).chat([{"role": "user", "content": "there"}], temperature=0.2, max_tokens=5)
    assert again.text == "hello there" and again.cached and len(srv.requests) == 1  # a new client, same cache file
    other = c.chat([{"role": "user", "content": "there"}], temperature=0.7, max_tokens=5)  # other params: a new answer
    assert not other.cached and len(srv.requests) == 2
    c.chat([{"role": "user", "content": "there"}], sample=1, temperature=0.2, max_tokens=5)  # another sample: new too
    assert len(srv.requests) == 3
    assert KEY not in (tmp_path / "cache.jsonl").read_text()


def test_retries_rate_limits_server_errors_and_timeouts(server, key, tmp_path, caplog):
    srv = server(cues=[429, 503, "slow"])
    c = client(srv, tmp_path)
    assert c.chat([{"role": "user", "content": "q"}]).text == "ok"
    assert len(srv.requests) == 4 and c.stats.retried == 3
    assert KEY not in caplog.text


def test_goes_through_the_openai_sdk_and_retries_a_garbage_reply(server, key, tmp_path):
    srv = server(cues=["garbage"])
    c = client(srv, tmp_path)
    assert c.chat([{"role": "user", "content": "q"}]).text == "ok" and c.stats.retried == 1
    assert len(srv.requests) == 2 and all(agent.startswith("OpenAI/Python") for agent in srv.agents)


def test_gives_up_after_bounded_retries_and_on_client_errors(server, key, tmp_path):
    srv = server(cues=[500] * 10)
    with pytest.raises(ChatError, match="gave up after 4 attempts") as err:
        client(srv, tmp_path).chat([{"role": "user", "content": "q"}])
    assert len(srv.requests) == 4 and KEY not in str(err.value)

    srv = server(cues=[401])
    with pytest.raises(ChatError, match=r"HTTP 401.*JUDGE_TEST_KEY") as err:
        client(srv, tmp_path).chat([{"role": "user", "content": "q"}])
    assert len(srv.requests) == 1 and KEY not in str(err.value)


@pytest.mark.parametrize(
    "reply, count, expected",
    [
        ("8 7\nAssistant 1 was better.", 2, [8.0, 7.0]),
        ("8, 7.5", 2, [8.0, 7.5]),
        ("Assistant 1: 9  Assistant 2: 6\n...", 2, [9.0, 6.0]),
        ("\n9\nGood.", 1, [9.0]),
        ("Score: 8/10", 1, [8.0]),
        ("N/A", 1, None),
        ("N/A\n8", 1, None),  # the score must be on the first line
        ("8", 2, None),
        ("11 3", 2, None),
        ("", 1, None),
    ],
)
def test_parse_scores(reply, count, expected):
    assert parse_scores(reply, count) == expected


@pytest.mark.parametrize(
    "reply, expected",
    [  # what FastChat's parse_score returns for each (None: its [-1, -1])
        ("8 7", [8.0, 7.0]),
        ("8 7\nAssistant 1 was more detailed.", [8.0, 7.0]),
        ("8,7", [8.0, 7.0]),
        ("8.5 6", [8.5, 6.0]),
        ("8, 7", None),  # the comma becomes a space: "8  7" splits into three fields
        ("Assistant 1: 8", None),
        ("Assistant 1: 8\nAssistant 2: 7", None),
        ("8 7 ", None),  # a trailing space is a third, empty field
        ("\n8 7", None),  # only the first line is read
        ("N/A", None),
        ("", None),
    ],
)
def test_fastchat_rule_reads_what_fastchat_read(reply, expected):
    assert fastchat_scores(reply) == expected
    assert reader("fastchat", 2)(reply) == (expected, "first line" if expected else None)


def test_math_tuple_is_read_as_fastchat_users_fixed_it_and_only_for_the_math_prompt():
    review = (
        "First, I will solve the problem independently:\n\n3x + 2 = 11, so x = 3.\n\nAssistant 1 is wrong.\n\n"
        "Output: (1, 7)"
    )
    assert fastchat_scores(review) is None
    assert reader("fastchat", 2, math_tuple=True)(review) == ([1.0, 7.0], "math tuple")
    assert reader("fastchat", 2, math_tuple=False)(review) == (None, None)
    assert reader("lenient", 2, math_tuple=True)(review) == (None, None)  # lenient re-asks instead


def test_fastchat_rule_never_asks_again_and_says_what_it_read(server, key, tmp_path, reviewers):
    from gpt4llm.evaluation.responses import read_responses

    replies = {
        "Question 1?": "8 7\nGood.",
        "Question 2?": "8, 7\nGood.",
        "Question 3?": "Let me solve it.\n...\n(2, 9)",
    }
    srv = server(reply=lambda r: next(v for k, v in replies.items() if k in r["messages"][-1]["content"]))
    mine = read_responses(
        answer_file(tmp_path / "mine.jsonl", "ours", {1: ("generic", "a"), 2: ("coding", "b"), 3: ("math", "c")})
    )
    theirs = read_responses(
        answer_file(
            tmp_path / "theirs.jsonl", "gpt-3.5", {1: (None, "x"), 2: (None, "y"), 3: (None, "z")}, layout="fastchat"
        )
    )
    reviews, summary = judge(
        client(srv, tmp_path), mine, theirs, "pairwise", {"temperature": 0.2}, max_parse_retries=2, reviewers=reviewers
    )
    assert len(srv.requests) == 3  # nothing asked twice under FastChat's rule
    assert summary["score_rule"] == "fastchat" and summary["totals"] == [10.0, 16.0]
    assert summary["replies_read"] == {"first line": 1, "math tuple": 1} and summary["replies_unparsable"] == 1
    assert summary["problems"]["unparsable (left out)"]["ids"] == [2]
    sent = {r["messages"][-1]["content"].split("\n")[1]: r["messages"] for r in srv.requests}
    assert sent["Question 2?"][0] == {"role": "system", "content": SYSTEM}
    assert sent["Question 2?"][1]["content"].endswith("[System]\nReview the code; two scores first.\n\n")
    assert "[System]\nRate both" in sent["Question 1?"][1]["content"]  # generic: FastChat's default reviewer


def test_fastchat_files_are_the_pinned_ones_and_build_fastchats_prompts():
    """FastChat's own files (../shared, FastChat commit 6d987107): their git blob ids are the ones the judge config
    pins, and the messages are FastChat's gen_prompt output, byte for byte."""
    from omegaconf import OmegaConf

    from gpt4llm.data.sources import verify_checksum

    directory = SHARED_DATA / "fastchat"
    if not (directory / "prompt.jsonl").exists():
        pytest.skip(f"{directory} is absent (../shared is for development only)")
    pinned = OmegaConf.load(CONF / "metric" / "judge.yaml").fastchat
    verify_checksum(directory / "prompt.jsonl", pinned.prompts.checksum)
    verify_checksum(directory / "reviewer.jsonl", pinned.reviewers.checksum)
    raw = [json.loads(line) for line in (directory / "prompt.jsonl").read_text().splitlines()]
    r = FastChatReviewers.from_files(directory / "prompt.jsonl", directory / "reviewer.jsonl")
    for category, prompt in (("generic", raw[0]), ("writing", raw[0]), ("coding", raw[1]), ("math", raw[2])):
        system, user = r.messages(category, "Q?", "A1", "A2")
        assert system == {"role": "system", "content": prompt["system_prompt"]}
        assert user["content"] == (
            prompt["prompt_template"]
            .replace("{question}", "Q?")
            .replace("{answer_1}", "A1")
            .replace("{answer_2}", "A2")
            .replace("{prompt}", prompt["defaults"]["prompt"])
        )
    assert r.asks_for_tuple("math") and not r.asks_for_tuple("coding") and not r.asks_for_tuple("generic")


def answer_file(path, model, answers: dict, layout="ours"):
    with open(path, "w") as f:
        for qid, (category, text) in answers.items():
            if layout == "ours":
                line = {
                    "id": qid,
                    "model": model,
                    "category": category,
                    "instruction": f"Question {qid}?",
                    "input": "",
                    "response": text,
                }
            else:  # FastChat's answer table
                line = {"question_id": qid, "model_id": model, "text": text, "answer_id": f"a{qid}"}
            f.write(json.dumps(line) + "\n")
    return path


def review_reply(request) -> str:
    """Scores from the answers' text ("score N" in an answer), "N/A" for question 3 until its second sample."""
    prompt = request["messages"][-1]["content"]
    if "Question 3?" in prompt and not hasattr(review_reply, "seen3"):
        review_reply.seen3 = True
        return "N/A"
    if "Question 4?" in prompt:
        return "I cannot rate this."
    return " ".join(re.findall(r"score (\d+)", prompt)) + "\nExplanation."


def test_pairwise_relative_scores_retries_unparsable_and_reruns_for_free(server, key, tmp_path, reviewers):
    from gpt4llm.evaluation.responses import read_responses

    if hasattr(review_reply, "seen3"):
        del review_reply.seen3
    srv = server(reply=review_reply, cues=[429])
    mine = read_responses(
        answer_file(
            tmp_path / "mine.jsonl",
            "ours",
            {
                1: ("generic", "score 8"),
                2: ("generic", "score 6"),
                3: ("math", "score 5"),
                4: ("math", "score 9"),
                5: ("math", ""),
            },
        )
    )
    theirs = read_responses(
        answer_file(
            tmp_path / "gpt35.jsonl",
            "gpt-3.5",
            {
                1: (None, "score 9"),
                2: (None, "score 7"),
                3: (None, "score 10"),
                4: (None, "score 1"),
            },
            layout="fastchat",
        )
    )
    reviews, summary = judge(
        client(srv, tmp_path),
        mine,
        theirs,
        "pairwise",
        {"temperature": 0.2},
        max_parse_retries=2,
        reviewers=reviewers,
        score_rule="lenient",
    )

    assert summary["model"] == "ours" and summary["opponent"] == "gpt-3.5"
    assert summary["totals"] == [19.0, 26.0] and summary["relative"] == pytest.approx(100 * 19 / 26)
    assert summary["per_category"]["generic"]["totals"] == [14.0, 16.0]
    assert summary["per_category"]["math"]["totals"] == [5.0, 10.0]  # question 3, after one unparsable reply
    assert summary["problems"]["unparsable (left out)"] == {"count": 1, "ids": [4]}
    assert summary["problems"]["no opponent answer (left out)"] == {"count": 1, "ids": [5]}
    by_id = {r["id"]: r for r in reviews}
    assert by_id[3]["replies"] == [["N/A", "5 10\nExplanation."]] and by_id[4]["status"] == "unparsable"
    assert len(by_id[4]["replies"][0]) == 3  # first ask + max_parse_retries
    # The math questions get FastChat's math reviewer prompt, the others the general one.
    math_prompt = next(r for r in srv.requests if "Question 3?" in r["messages"][-1]["content"])["messages"][-1][
        "content"
    ]
    assert "Python tuple" in math_prompt and math_prompt.startswith(
        "[Question]\nQuestion 3?\n\n[The Start of Assistant 1's Answer]\nscore 5"
    )
    sent = len(srv.requests)
    assert sent == 1 + 4 + 2 + 1  # the 429, four questions, question 3 and 4 again, question 4 a third time

    reviews_again, summary_again = judge(
        client(srv, tmp_path),
        mine,
        theirs,
        "pairwise",
        {"temperature": 0.2},
        2,
        reviewers=reviewers,
        score_rule="lenient",
    )
    assert len(srv.requests) == sent, "a rerun must be answered from the cache"
    assert summary_again["totals"] == summary["totals"] and summary_again["requests"]["cached"] == 7


def test_single_answer_scoring_uses_the_papers_prompt(server, key, tmp_path):
    from gpt4llm.evaluation.responses import read_responses

    srv = server(reply=lambda r: re.search(r"score (\d+)", r["messages"][-1]["content"])[1] + "\nFine.")
    mine = read_responses(answer_file(tmp_path / "mine.jsonl", "ours", {1: ("a", "score 8"), 2: ("b", "score 4")}))
    theirs = read_responses(answer_file(tmp_path / "gpt4.jsonl", "gpt-4", {1: ("a", "score 10"), 2: ("b", "score 6")}))
    _, summary = judge(client(srv, tmp_path), mine, theirs, "single")
    assert summary["totals"] == [12.0, 16.0] and summary["relative"] == 75.0
    assert len(srv.requests) == 4 and all(len(r["messages"]) == 1 for r in srv.requests)  # no system prompt
    prompts = sorted(r["messages"][0]["content"] for r in srv.requests)  # sent concurrently: any order
    assert prompts[0].startswith(
        "### Instruction\nQuestion 1?\n### Response\nscore 10\n### End of Response\nWe would like"
    )

    _, alone = judge(client(srv, tmp_path), mine, None, "single")
    assert alone["opponent"] is None and alone["mean"] == 6.0 and len(srv.requests) == 4  # cached


@pytest.mark.slow
def test_judge_cli_writes_summary_and_never_the_key(server, key, tmp_path):
    import os
    import subprocess
    import sys

    srv = server(reply=lambda r: "7 8\nClose.")
    prompts, reviewer_file = write_fastchat_files(tmp_path)
    mine = answer_file(tmp_path / "mine.jsonl", "ours", {1: ("generic", "a"), 2: ("math", "b")})
    theirs = answer_file(tmp_path / "theirs.jsonl", "chatgpt", {1: (None, "c"), 2: (None, "d")})
    args = [
        "metric=judge",
        f"responses={mine}",
        f"metric.opponent={theirs}",
        f"metric.base_url={srv.base_url}",
        "metric.model=gpt-4",
        "metric.api_key_env=JUDGE_TEST_KEY",
        f"paths.data_dir={tmp_path / 'data'}",
        f"metric.fastchat.prompts.path={prompts}",
        f"metric.fastchat.reviewers.path={reviewer_file}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, "-m", "gpt4llm.evaluate", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(srv.requests) == 2  # the second run was answered from data/cache
    summary = json.loads((tmp_path / "run" / "judge_summary_ours.json").read_text())
    assert summary["totals"] == [14.0, 16.0] and "14 : 16 = 88%" in proc.stdout
    assert (
        summary["score_rule"] == "fastchat"
        and "score rule fastchat: replies read 2 by first line; unparsable 0" in proc.stdout
    )
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not [p for p in written if KEY in p.read_text(errors="replace")], "the API key was written to disk"
    assert KEY not in proc.stdout + proc.stderr
