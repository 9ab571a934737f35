"""synthesize through OpenAI's Batch API, against a local server speaking the Batch API's endpoints (files, batches,
file content) with the official `openai` client: submitted once, resumed by polling after a kill, answers cached."""

from __future__ import annotations

import json

import pytest

from helpers.configs import synth_cfg
from helpers.fake_servers import BatchServer
from helpers.runs import write


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("SYNTH_TEST_KEY", "sk-test")


def test_synthesize_through_the_batch_api(tmp_path, key, monkeypatch):
    import gpt4llm.synthesize as S
    from gpt4llm.inference import openai_client

    server = BatchServer(polls=3)
    try:
        seed = write(
            tmp_path / "seed.json",
            [
                {"instruction": "Say hi.", "input": ""},
                {"instruction": "CUE:fail now.", "input": ""},
                {"instruction": "Say bye.", "input": ""},
            ],
        )
        cfg = synth_cfg(
            tmp_path,
            server.base_url,
            "job=answer",
            f"instructions={seed}",
            "teacher.batch=true",
            "teacher.batch_poll_seconds=0.01",
        )

        real_sleep = openai_client.time.sleep

        def killed(seconds):  # the process dies while it waits for the batch
            raise KeyboardInterrupt

        monkeypatch.setattr(openai_client.time, "sleep", killed)
        with pytest.raises(KeyboardInterrupt):
            S.synthesize(cfg)
        assert server.created == 1 and len(list((tmp_path / "cache" / "batches").glob("*.json"))) == 1
        monkeypatch.setattr(openai_client.time, "sleep", real_sleep)
        report = S.synthesize(cfg)  # the rerun polls the batch it had submitted: nothing is submitted (or paid) twice
        out = json.loads((tmp_path / "out" / "seed.answers.json").read_text())
        assert [r["output"] for r in out] == ["Answer: Say hi.", "Answer: Say bye."]
        assert server.created == 1 and report["written"] == 2
        assert not list((tmp_path / "cache" / "batches").glob("*.json"))  # the finished batch's state is gone

        again = S.synthesize(cfg)  # only the failed one is submitted again, in a batch of its own
        assert server.created == 2 and again["written"] == 2
        assert len(server.files[server.batches["batch-2"]["input"]].splitlines()) == 1
    finally:
        server.close()


def test_batch_answers_keep_their_log_probabilities(tmp_path):
    """AlpacaEval's weighted judge reads the first token's log-probabilities: a batch answer keeps them in the cache,
    as a live one does, so a later run (batch or not) reads the same preference."""
    from gpt4llm.inference.openai_client import ChatClient

    server = BatchServer(polls=1)
    try:
        client = ChatClient(server.base_url, "judge", api_key_env=None, cache_path=tmp_path / "cache.jsonl")
        client.batch_dir, client.batch_poll_seconds = tmp_path / "batches", 0.01
        request = {"messages": [{"role": "user", "content": "Instruction:\nPick m or M.\n"}], "sample": 0}
        request |= {"max_tokens": 1, "logprobs": True, "top_logprobs": 5}
        [result] = client.chat_many([request])
        assert result.cached and result.text == "Answer: Pick m or M."
        assert result.logprobs["content"][0]["top_logprobs"][1] == {"token": "M", "logprob": -1.5}
        again = ChatClient(server.base_url, "judge", api_key_env=None, cache_path=tmp_path / "cache.jsonl")
        assert again.chat(**request).logprobs == result.logprobs and server.created == 1
    finally:
        server.close()
