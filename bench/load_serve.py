"""Load test for `gpt4llm.serve`: a bounded number of concurrent chat requests to 127.0.0.1, every answer checked.

    python bench/load_serve.py --model-dir logs/train/runs/<time>/export      # starts the server itself (port 0)
    python bench/load_serve.py --base-url http://127.0.0.1:8000/v1 --model <name>   # a server already running

Sends --requests requests (default 200), --concurrency at a time (default 16), each thread on its own keep-alive
connection, drawn from --prompts distinct demo prompts: greedy (temperature 0) and sampled (every 4th), plain
instructions and already-templated prompts, every --stream-every-th streamed. Each prompt has its own max_tokens.

Checked for every answer: HTTP 200, the chat.completion (or chunk) layout, finish_reason, usage adding up, at most
max_tokens; and, for greedy requests, the same text as the answer to that prompt asked alone before the load (so
batching under load changes no answer). Printed: requests per second, latency percentiles, completion tokens per
second, errors by kind. The exit status is 1 when any request failed a check. Only loopback addresses are accepted.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def start_server(model_dir: str, key: str, extra: list[str]) -> tuple[subprocess.Popen, str, str]:
    env = dict(os.environ, GPT4LLM_API_KEY=key, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpt4llm.serve",
            f"model.path={model_dir}",
            "port=0",
            "host=127.0.0.1",
            "hydra.run.dir=/tmp/gpt4llm_load_serve",
            "hydra.output_subdir=null",
            *extra,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:
        if line.startswith("Serving '"):
            name = line.split("'")[1]
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep the pipe drained
            return proc, line.rsplit(" at ", 1)[1].strip(), name
    raise SystemExit(f"the server did not start (exit {proc.wait()})")


class Client:
    """One keep-alive connection per thread; a streamed answer ends its connection, so the next one reconnects."""

    def __init__(self, host: str, port: int, key: str | None):
        self.host, self.port, self.key, self.local = host, port, key, threading.local()

    def post(self, body: dict) -> tuple[int, str]:
        for attempt in range(2):  # a kept-alive connection the server closed meanwhile: reconnect once
            conn = getattr(self.local, "conn", None) or http.client.HTTPConnection(self.host, self.port, timeout=600)
            self.local.conn = conn
            try:
                headers = {"Content-Type": "application/json"} | (
                    {"Authorization": f"Bearer {self.key}"} if self.key else {}
                )
                conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
                response = conn.getresponse()
                text = response.read().decode()
                if response.getheader("Connection", "").lower() == "close":
                    conn.close()
                    self.local.conn = None
                return response.status, text
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()
                self.local.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


def check(body: dict, status: int, text: str, model: str, expected: str | None) -> tuple[str | None, int]:
    """(the problem, or None; completion tokens) of one answer."""
    if status != 200:
        return f"HTTP {status}", 0
    try:
        if body.get("stream"):
            events = [json.loads(line[6:]) for line in text.split("\n\n") if line.startswith("data: {")]
            if not text.endswith("data: [DONE]\n\n") or not events:
                return "stream not ended by [DONE]", 0
            if any(e.get("object") != "chat.completion.chunk" or e.get("model") != model for e in events):
                return "bad chunk", 0
            content = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
            finish = [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1]
            usage = events[-1].get("usage") or {}
        else:
            reply = json.loads(text)
            [choice] = reply["choices"]
            if (
                reply.get("object") != "chat.completion"
                or reply.get("model") != model
                or choice["message"]["role"] != "assistant"
            ):
                return "bad layout", 0
            content, finish, usage = choice["message"]["content"], choice["finish_reason"], reply["usage"]
    except (ValueError, KeyError, IndexError, TypeError) as err:
        return f"unreadable answer ({type(err).__name__})", 0
    if not isinstance(content, str) or finish not in ("stop", "length"):
        return "bad content or finish_reason", 0
    used = usage.get("completion_tokens", -1)
    if not 0 <= used <= body["max_tokens"] or usage.get("total_tokens") != usage.get("prompt_tokens", -1) + used:
        return "usage does not add up", 0
    if finish == "length" and used != body["max_tokens"]:
        return "cut before max_tokens", used
    if expected is not None and content != expected:
        return "greedy answer differs from the answer alone", used
    return None, used


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--model-dir", help="start `python -m gpt4llm.serve model.path=DIR port=0` for the test")
    where.add_argument("--base-url", help="a running server, e.g. http://127.0.0.1:8000/v1 (loopback only)")
    parser.add_argument("--model", help="the served model's name (with --base-url)")
    parser.add_argument(
        "--api-key-env", default="GPT4LLM_API_KEY", help="with --base-url: the variable holding its key"
    )
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=20, help="distinct prompts the requests are drawn from")
    parser.add_argument("--max-tokens", type=int, default=32, help="the largest max_tokens of a request")
    parser.add_argument("--stream-every", type=int, default=10, help="every n-th request is streamed (0: none)")
    parser.add_argument(
        "--serve-arg", action="append", default=[], help="an override for the started server, e.g. max_batch=16"
    )
    args = parser.parse_args()
    if not 1 <= args.requests <= 10_000 or not 1 <= args.concurrency <= 256:
        parser.error("--requests must be 1..10000 and --concurrency 1..256 (a bounded test)")

    sys.path.insert(0, str(ROOT / "src"))
    from gpt4llm.data.demo import make_demo_records
    from gpt4llm.data.prompts import format_prompt

    server = None
    if args.model_dir:
        key = "sk-load-" + secrets.token_hex(8)
        server, base_url, model = start_server(args.model_dir, key, args.serve_arg)
    else:
        base_url, model, key = args.base_url, args.model, os.environ.get(args.api_key_env)
        if not model:
            parser.error("--base-url needs --model")
    url = urlsplit(base_url)
    if url.hostname not in LOOPBACK:
        parser.error(f"{base_url}: this load test only talks to 127.0.0.1")
    client = Client(url.hostname, url.port or 80, key)
    try:
        records = make_demo_records(args.prompts, seed=123)
        prompts = []
        for i, r in enumerate(records):  # half plain instructions (the server templates them), half templated
            content = (
                format_prompt(r["instruction"], r["input"])
                if i % 2
                else r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")
            )
            prompts.append({"content": content, "max_tokens": 4 + (i * 7) % (args.max_tokens - 3)})

        def body(i: int) -> dict:
            p = prompts[i % len(prompts)]
            return {
                "model": model,
                "messages": [{"role": "user", "content": p["content"]}],
                "max_tokens": p["max_tokens"],
                "temperature": 1.0 if i % 4 == 3 else 0,
                "stream": bool(args.stream_every) and i % args.stream_every == 0,
                "stream_options": {"include_usage": True},
            }

        # The greedy answer to each prompt, asked alone: what every greedy answer under load must equal.
        expected = {}
        for i in range(len(prompts)):
            b = body(i) | {"temperature": 0, "stream": False}
            status, text = client.post(b)
            if status != 200:
                raise SystemExit(f"the reference request failed: HTTP {status}: {text[:300]}")
            expected[i] = json.loads(text)["choices"][0]["message"]["content"]

        def one(i: int) -> tuple[float, str | None, int]:
            b = body(i)
            started = time.perf_counter()
            try:
                status, text = client.post(b)
            except OSError as err:
                return time.perf_counter() - started, f"{type(err).__name__}", 0
            took = time.perf_counter() - started
            problem, used = check(b, status, text, model, expected[i % len(prompts)] if b["temperature"] == 0 else None)
            return took, problem, used

        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - started
    finally:
        if server is not None:
            server.terminate()  # SIGTERM: the server stops as on Ctrl-C
            server.wait(timeout=60)

    latencies = sorted(r[0] for r in results)
    errors: dict[str, int] = {}
    for _, problem, _ in results:
        if problem:
            errors[problem] = errors.get(problem, 0) + 1
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    tokens = sum(r[2] for r in results)
    print(
        f"\nLoad test of {model} at {base_url}: {args.requests} requests, {args.concurrency} concurrent, "
        f"{len(prompts)} distinct prompts, max_tokens 4-{args.max_tokens}, every {args.stream_every or 'no'}th streamed"
    )
    print(f"  wall {wall:.2f}s  |  {args.requests / wall:.2f} req/s  |  {tokens / wall:.1f} completion tokens/s")
    print(
        f"  latency p50 {q[49] * 1000:.0f} ms  p90 {q[89] * 1000:.0f} ms  p99 {q[98] * 1000:.0f} ms  "
        f"max {latencies[-1] * 1000:.0f} ms"
    )
    print(
        f"  errors: {sum(errors.values())}"
        + (f"  {errors}" if errors else "  (every answer well-formed; every greedy one equal to its answer alone)")
    )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
