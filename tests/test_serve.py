"""`gpt4llm.serve` with the tiny model on 127.0.0.1, over real HTTP: the prompt template, batched answers equal to
one-by-one answers, streaming, the key, 4xx errors in OpenAI's shape after which the server keeps serving, the name a
model is served under and what is said at start, and the command line end to end (serve, then synthesize against
it)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from gpt4llm.data.demo import make_demo_records
from gpt4llm.data.formats import prompt_format
from gpt4llm.data.prompts import format_prompt
from gpt4llm.inference.openai_protocol import chat_prompt, parse_chat_request
from gpt4llm.inference.server import ServerSettings, load_server, served_name
from gpt4llm.serve import announce
from helpers.runs import raw_chat_request


def prompt_from_messages(messages):
    """A chat's prompt for a model trained on the paper's Alpaca prompt."""
    return chat_prompt(prompt_format("alpaca"), None, parse_chat_request({"messages": messages}).messages)


KEY = "sk-serve-NEVER-WRITE-THIS-777"
RECORDS = make_demo_records(6, seed=11)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    # A generous batch_wait, so that requests sent together reliably share a batch on a busy machine.
    settings = ServerSettings(api_key=KEY, max_batch=4, batch_wait=0.3, max_body_bytes=20_000, default_max_tokens=16)
    s = load_server(str(tiny_model_dir), name="tiny", settings=settings).start()
    yield s
    s.close()


def call(server, method: str, path: str, body=None, key: str | None = KEY, raw: bytes | None = None, headers=None):
    """(status, parsed JSON or the raw text) of one request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    h = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {}) | (headers or {})
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers=h)
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    try:
        return response.status, json.loads(text)
    except json.JSONDecodeError:
        return response.status, text


def chat(server, content: str, **params):
    return call(
        server,
        "POST",
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": content}], **params},
    )


def test_messages_become_the_alpaca_prompt():
    assert prompt_from_messages([{"role": "user", "content": "Say hi."}]) == format_prompt("Say hi.")
    templated = format_prompt("Sort.", "3, 1")
    assert (
        prompt_from_messages([{"role": "system", "content": "Be brief."}, {"role": "user", "content": templated}])
        == templated
    )
    assert prompt_from_messages([{"role": "user", "content": templated.removesuffix("### Response:")}]) == templated
    parts = [
        {"role": "user", "content": "old"},
        {"role": "assistant", "content": "x"},
        {"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi."}]},
    ]
    assert prompt_from_messages(parts) == format_prompt("Say hi.")  # the last user message is the instruction


def test_models_health_and_key(server):
    assert call(server, "GET", "/health", key=None) == (200, {"status": "ok"})
    status, models = call(server, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["tiny"] and models["object"] == "list"
    for key in (None, "sk-wrong"):
        status, body = call(
            server, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}, key=key
        )
        assert status == 401 and body["error"]["code"] == "invalid_api_key" and KEY not in json.dumps(body)
    assert call(server, "GET", "/v1/models", key=None)[0] == 401


def test_greedy_answer_is_the_models_answer_to_the_template(server, tiny_model_dir, tokenizer):
    from gpt4llm.models.decoding import generate_responses

    r = RECORDS[0]
    status, body = chat(server, format_prompt(r["instruction"], r["input"]), temperature=0, max_tokens=8)
    assert status == 200 and body["object"] == "chat.completion" and body["model"] == "tiny"
    [choice] = body["choices"]
    expected = generate_responses(server.batcher.model, tokenizer, [r], max_new_tokens=8)[0]
    assert choice["message"] == {"role": "assistant", "content": expected}
    prompt_tokens = len(tokenizer(format_prompt(r["instruction"], r["input"]))["input_ids"])
    assert body["usage"]["prompt_tokens"] == prompt_tokens
    assert choice["finish_reason"] in ("stop", "length") and body["usage"]["completion_tokens"] <= 8
    # A plain instruction is templated by the server: the same prompt, the same answer.
    assert (
        chat(server, "Say hi.", temperature=0, max_tokens=8)[1]["choices"][0]["message"]["content"]
        == chat(server, format_prompt("Say hi."), temperature=0, max_tokens=8)[1]["choices"][0]["message"]["content"]
    )


def test_concurrent_requests_share_a_batch_and_answer_as_alone(server):
    prompts = [format_prompt(r["instruction"], r["input"]) for r in RECORDS[:4]]
    limits = [3, 8, 5, 8]
    alone = [chat(server, p, temperature=0, max_tokens=m)[1]["choices"][0] for p, m in zip(prompts, limits)]
    batches = server.batcher.batches
    together: list = [None] * 4

    def ask(i):
        together[i] = chat(server, prompts[i], temperature=0, max_tokens=limits[i])[1]["choices"][0]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert server.batcher.largest_batch >= 2 and server.batcher.batches - batches < 4
    assert together == alone  # batched (left-padded, each cut at its own max_tokens) = one by one


def test_a_seeded_sampled_request_answers_the_same_alone_and_beside_others(server):
    """OpenAI's `seed`: the same seed, settings and prompt give the same sampled answer, whatever else runs beside it
    (each request samples with its own generator); another seed another answer."""
    prompt = format_prompt(RECORDS[2]["instruction"], RECORDS[2]["input"])
    params = {"temperature": 1.5, "max_tokens": 12, "seed": 1234}
    alone = chat(server, prompt, **params)[1]["choices"][0]["message"]["content"]
    others: list = [None] * 3

    def ask(i):
        p = prompt if i == 0 else format_prompt(RECORDS[3 + i]["instruction"], RECORDS[3 + i]["input"])
        others[i] = chat(server, p, **(params if i == 0 else {"temperature": 1.0, "max_tokens": 4 + i}))[1]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert others[0]["choices"][0]["message"]["content"] == alone
    again = [
        chat(server, prompt, **(params | {"seed": seed}))[1]["choices"][0]["message"]["content"] for seed in (1, 2)
    ]
    assert len({alone, *again}) > 1


def test_streaming_sends_chunks_that_add_up_to_the_answer(server):
    prompt = format_prompt(RECORDS[1]["instruction"], RECORDS[1]["input"])
    whole = chat(server, prompt, temperature=0, max_tokens=10)[1]
    status, text = chat(
        server, prompt, temperature=0, max_tokens=10, stream=True, stream_options={"include_usage": True}
    )
    assert status == 200 and text.endswith("data: [DONE]\n\n")
    events = [json.loads(line[6:]) for line in text.split("\n\n") if line.startswith("data: {")]
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert content == whole["choices"][0]["message"]["content"]
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == whole["choices"][0][
        "finish_reason"
    ]
    assert events[-1]["usage"] == whole["usage"]


def test_sampling_n_stop_and_limits(server):
    torch.manual_seed(0)
    status, body = chat(server, "Say hi.", temperature=1.5, n=3, max_tokens=6)
    assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert 3 <= body["usage"]["completion_tokens"] <= 18 and len({c["message"]["content"] for c in body["choices"]}) > 1
    greedy = chat(server, "Say hi.", temperature=0, max_tokens=8)[1]["choices"][0]["message"]["content"]
    cut = greedy[2:5]
    if cut:
        stopped = chat(server, "Say hi.", temperature=0, max_tokens=8, stop=[cut])[1]["choices"][0]
        assert stopped["message"]["content"] == greedy[: greedy.find(cut)] and stopped["finish_reason"] == "stop"
    status, body = chat(server, "Say hi.")  # no max_tokens: the server's default (16 here), greedy or not
    assert status == 200 and body["usage"]["completion_tokens"] <= 16


BAD = [
    ({"messages": []}, 400, "messages"),
    ({"model": "tiny"}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0]"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "system", "content": "only a system prompt"}]}, 400, "messages"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": True}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2, "stream": True, "temperature": 1}, 400, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400, "stream"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": [1]}, 400, "stop"),
    ({"messages": [{"role": "user", "content": "apple banana " * 300}]}, 400, "messages"),  # over the 512-token context
    ([1, 2], 400, None),
]


@pytest.mark.parametrize("body, status, param", BAD, ids=[f"{s}-{p}-{i}" for i, (_, s, p) in enumerate(BAD)])
def test_bad_requests_get_openai_errors(server, body, status, param):
    got, answer = call(server, "POST", "/v1/chat/completions", body)
    assert (
        got == status
        and set(answer["error"]) == {"message", "type", "param", "code"}
        and answer["error"]["param"] == param
    )


def test_malformed_and_oversized_bodies_then_the_server_keeps_serving(server):
    status, body = call(server, "POST", "/v1/chat/completions", raw=b'{"messages": [')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = call(server, "POST", "/v1/chat/completions", raw=b"\xff\xfe")
    assert status == 400
    status, body = call(
        server,
        "POST",
        "/v1/chat/completions",
        raw=json.dumps({"messages": [{"role": "user", "content": "x" * 30_000}]}).encode(),
    )
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert call(server, "POST", "/v1/completions", {"prompt": "x"})[0] == 404
    assert call(server, "GET", "/v1/nothing")[0] == 404
    # No Content-Length at all, on a raw socket.
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n\r\n"
        )
        assert sock.recv(1000).startswith(b"HTTP/1.1 411")
    # A client that sends half a request and leaves.
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b'POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{"mess')
    status, body = chat(server, "Say hi.", temperature=0, max_tokens=4)
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"


def test_one_connection_many_requests(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    for _ in range(3):  # keep-alive, errors included
        for body, expected in (
            ({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}, 200),
            ({"messages": []}, 400),
        ):
            conn.request(
                "POST",
                "/v1/chat/completions",
                json.dumps(body),
                {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
            )
            response = conn.getresponse()
            assert response.status == expected and json.loads(response.read())
    conn.close()


@pytest.mark.slow
def test_cli_serve_then_synthesize_against_it(tiny_model_dir, tmp_path):
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        GPT4LLM_API_KEY=KEY,
        TEACHER_KEY=KEY,
    )
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpt4llm.serve",
            f"model.path={tiny_model_dir}",
            "port=0",
            "threads=1",
            f"paths.log_dir={tmp_path / 'logs'}",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        first = serve.stdout.readline()
        deadline = time.time() + 120
        while "Serving" not in first and time.time() < deadline and serve.poll() is None:
            first = serve.stdout.readline()
        assert "Serving 'tiny'" in first and "Bearer key from $GPT4LLM_API_KEY" in first, first
        assert serve.stdout.readline().startswith("Prompt format: alpaca")
        base_url = first.rsplit(" at ", 1)[1].strip()
        assert base_url.startswith("http://127.0.0.1:")
        seed = tmp_path / "seed.json"
        seed.write_text(json.dumps([{"instruction": r["instruction"], "input": r["input"]} for r in RECORDS]))
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "gpt4llm.synthesize",
                "job=answer",
                f"instructions={seed}",
                f"teacher.base_url={base_url}",
                "teacher.model=tiny",
                "teacher.api_key_env=TEACHER_KEY",
                "teacher.prices=null",
                "job.max_tokens=8",
                f"paths.data_dir={tmp_path / 'data'}",
                f"paths.log_dir={tmp_path / 'logs'}",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = tmp_path / "logs" / "synthesize" / "answer" / "seed" / "tiny" / "seed.answers.json"
        report = json.loads(out.with_name("seed.answers.report.json").read_text())
        assert report["requests"]["sent"] == 6 and len(json.loads(out.read_text())) == report["written"]
        assert report["written"] + report["empty_answer (left out)"]["count"] == 6
    finally:
        serve.terminate()  # SIGTERM: a clean stop, as Ctrl-C
        served_output = serve.communicate(timeout=60)[0]
    assert serve.returncode == 0, served_output[-3000:]
    written = [p for p in tmp_path.rglob("*") if p.is_file() and KEY in p.read_text(errors="replace")]
    assert not written and KEY not in served_output + proc.stdout + proc.stderr


# --- with the client users have: the official `openai` package -------------------------------------------------------
def sdk(server, **options):
    import openai

    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=120, **options)


def test_64_clients_at_once_are_all_answered(server):
    from concurrent.futures import ThreadPoolExecutor

    def ask(i: int) -> str:  # a client of its own each: 64 connections opened together
        reply = sdk(server).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=2, temperature=0
        )
        return reply.choices[0].finish_reason

    with ThreadPoolExecutor(64) as pool:
        reasons = list(pool.map(ask, range(64)))
    assert len(reasons) == 64 and set(reasons) <= {"stop", "length"}


def test_streaming_n_and_stop_through_the_sdk(server):
    client = sdk(server)
    messages = [{"role": "user", "content": "Sort 3, 1, 2."}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    parts = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True
        )
        if c.choices
    ]
    assert "".join(parts) == whole.choices[0].message.content
    several = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=1.0, n=3)
    assert len(several.choices) == 3
    text = whole.choices[0].message.content
    if len(text) > 2:  # stop at the text's second character: usage counts what is sent, not what was generated
        cut = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=12, temperature=0, stop=[text[1:3]]
        )
        sent = cut.choices[0].message.content
        assert sent == text[: text.find(text[1:3])] and cut.choices[0].finish_reason == "stop"
        assert cut.usage.completion_tokens == len(server.tokenizer(sent, add_special_tokens=False)["input_ids"])


def test_unsupported_fields_are_refused_by_name(server):
    import openai

    with pytest.raises(openai.BadRequestError, match="not supported by this server: logprobs"):
        sdk(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], logprobs=True)
    with pytest.raises(openai.BadRequestError, match="response_format"):
        sdk(server).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], response_format={"type": "json_object"}
        )


def test_streams_whose_clients_hang_up_stop_generating(server):
    import socket
    import time

    body = json.dumps(
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Write a long story."}],
            "max_tokens": 400,
            "temperature": 0,
            "stream": True,
        }
    ).encode()
    for _ in range(8):  # open a stream, read its first bytes, hang up
        conn = socket.create_connection((server.host, server.port))
        conn.sendall(raw_chat_request(KEY, body))
        conn.recv(100)
        conn.close()
    started = time.monotonic()
    sdk(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert time.monotonic() - started < 5, "generation went on for streams nobody was reading"


def test_port_in_use_and_a_missing_export_are_said_plainly(server, tiny_model_dir, tmp_path):
    from gpt4llm.errors import ServerStartError

    with pytest.raises(ServerStartError, match=f"port {server.port} on 127.0.0.1 is in use"):
        load_server(str(tiny_model_dir), settings=ServerSettings(port=server.port))
    with pytest.raises(ServerStartError, match="no such directory"):
        load_server(str(tmp_path / "nothing"))


# --- the name served, and what is said at start ----------------------------------------------------------------------
def training_run(runs, name: str, base: str | None, task: str | None = "SFTModule", model_dir=None):
    """<runs>/<name>/export as train leaves it: config.json with the training record (the base model), and the run's
    saved config naming the task; the tiny model's files when `model_dir` is given."""
    export = runs / name / "export"
    if model_dir is not None:
        shutil.copytree(model_dir, export)
    else:
        export.mkdir(parents=True)
        (export / "config.json").write_text("{}")
    config = json.loads((export / "config.json").read_text())
    (export / "config.json").write_text(json.dumps(config | ({"gpt4llm_base_model": base} if base else {})))
    if task:
        (runs / name / ".hydra").mkdir()
        module = {"SFTModule": "sft_module", "DPOModule": "dpo_module"}[task]
        (runs / name / ".hydra" / "config.yaml").write_text(f"task:\n  _target_: gpt4llm.models.{module}.{task}\n")
    return export


def test_the_served_name_is_what_the_model_is_not_when_it_was_trained(tmp_path):
    runs = tmp_path / "logs" / "train" / "runs"
    sft = training_run(runs, "2024-05-01_12-00-00_4242", "huggyllama/llama-7b")
    assert served_name(sft) == "llama-7b-sft"  # not the run's start time
    assert served_name(sft / "adapter") == "llama-7b-sft"  # an adapter's config is its base's: the export's record
    dpo = training_run(runs, "2024-05-02_09-30-00_77", str(sft), task="DPOModule")
    assert served_name(dpo) == "llama-7b-sft-dpo"  # trained from our SFT export: named through it
    assert served_name(training_run(runs, "123456", str(tmp_path / "models" / "vicuna-7b"))) == "vicuna-7b-sft"
    assert served_name(training_run(runs, "llama-gpt4", "huggyllama/llama-7b")) == "llama-gpt4"  # a person's name
    assert served_name(training_run(runs, "2024-05-03_08-00-00_1", None)) == "2024-05-03_08-00-00_1"  # no record
    assert served_name(training_run(runs, "2024-05-04_08-00-00_1", "org/base-1b", task=None)) == "base-1b-tuned"
    assert served_name(tmp_path / "models" / "vicuna-7b") == "vicuna-7b"  # not an export: its own name


def test_an_export_is_served_and_listed_under_its_models_name(tiny_model_dir, tmp_path, capsys):
    export = training_run(tmp_path / "runs", "2024-05-01_12-00-00_4242", str(tiny_model_dir), model_dir=tiny_model_dir)
    s = load_server(str(export), settings=ServerSettings(default_max_tokens=2)).start()
    try:
        assert s.name == "tiny-sft"
        status, models = call(s, "GET", "/v1/models", key=None)
        assert status == 200 and [m["id"] for m in models["data"]] == ["tiny-sft"]
        status, body = call(
            s, "POST", "/v1/chat/completions", {"model": "tiny-sft", "messages": [{"role": "user", "content": "Hi"}]}
        )
        assert status == 200 and body["model"] == "tiny-sft"
        announce(s, "GPT4LLM_API_KEY")
    finally:
        s.close()
    assert capsys.readouterr().out.startswith("Serving 'tiny-sft' (")


def test_start_says_where_it_serves_and_which_prompt_format(server, capsys):
    announce(server, "GPT4LLM_API_KEY")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Serving 'tiny' (") and lines[0].endswith(f" at {server.base_url}")
    assert lines[1] == f"Prompt format: {server.served.why}" and lines[1].startswith("Prompt format: alpaca")
    assert lines[2].startswith("  try: curl ") and KEY not in "\n".join(lines)
