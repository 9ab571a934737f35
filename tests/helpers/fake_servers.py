"""Fake servers on 127.0.0.1 for the tests, all of one shape (a Loopback HTTP server in a daemon thread, a handler
that reads the fake's state): an OpenAI-compatible chat endpoint with failures on cue (ChatServer), a teacher whose
answers depend on the prompt (Teacher), OpenAI's Batch API (BatchServer), and a file download (FileServer). Tests
start them through the `loopback` fixture (conftest.py), which closes them at the end."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Loopback:
    """An HTTP server on a free port of 127.0.0.1, answering with `handler` in a daemon thread until close()."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class QuietHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass


class ChatServer:
    """An OpenAI-compatible /v1/chat/completions. `cues` are consumed one per request: an int status code, "slow"
    (answers after the client's timeout), or None (a normal answer). `reply(request)` writes the answer text."""

    def __init__(self, reply=lambda request: "ok", cues=(), logprobs=None):
        """`logprobs(request)`: the choice's `logprobs` object (OpenAI's {"content": [...]}), or None to send none."""
        self.reply, self.cues, self.requests, self.auth, self.agents = reply, list(cues), [], [], []
        self.logprobs = logprobs
        self.lock = threading.Lock()
        server = self

        class Handler(QuietHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    server.auth.append(self.headers.get("Authorization"))
                    server.agents.append(self.headers.get("User-Agent", ""))
                    cue = server.cues.pop(0) if server.cues else None
                if self.path != "/v1/chat/completions":
                    return self.send_error(404)
                if cue == "garbage":  # a proxy's error page with status 200
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", "20")
                    self.end_headers()
                    self.wfile.write(b"<html>oops</html>   ")
                    return
                if cue == "slow":
                    time.sleep(2.5)
                elif isinstance(cue, int):
                    self.send_response(cue)
                    if cue == 429:
                        self.send_header("Retry-After", "0")
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")
                    return
                text = server.reply(body)
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                if server.logprobs is not None and (logprobs := server.logprobs(body)) is not None:
                    choice["logprobs"] = logprobs
                payload = json.dumps(
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "model": body["model"],
                        "choices": [choice],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
                    }
                ).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

        self.http = Loopback(Handler)
        self.base_url = self.http.url + "/v1"

    def close(self):
        self.http.close()


class Teacher:
    """An OpenAI-compatible teacher whose answers depend on the prompt, so cues work whatever the request order:
    CUE:429 and CUE:slow fail the first time (rate limit; an answer after the client's timeout), CUE:fail always
    fails (HTTP 500), CUE:length is cut off (finish_reason "length"), CUE:empty is answered with nothing.
    Translation prompts get "ZH[text]"; scoring prompts get the N of "score N" in the response ("N/A" for
    CUE:badscore); other prompts "Answer: <instruction>". Past the first `answer_limit` requests, they hang."""

    def __init__(self, answer_limit: int | None = None):
        self.requests, self.auth, self.delivered, self.seen, self.admitted = [], [], [], set(), 0
        self.answer_limit, self.lock, self.release = answer_limit, threading.Lock(), threading.Event()
        teacher = self

        class Handler(QuietHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = body["messages"][-1]["content"]
                with teacher.lock:
                    teacher.requests.append(body)
                    teacher.auth.append(self.headers.get("Authorization"))
                    first = text not in teacher.seen
                    teacher.seen.add(text)
                    hang = teacher.answer_limit is not None and teacher.admitted >= teacher.answer_limit
                    teacher.admitted += not hang
                if hang:
                    teacher.release.wait(30)
                    return self._send(503, {})
                if "CUE:fail" in text or ("CUE:429" in text and first):
                    return self._send(500 if "CUE:fail" in text else 429, {"error": {"message": "no"}})
                if "CUE:slow" in text and first:
                    time.sleep(1.5)
                reply, finish = teacher.reply(text)
                payload = {
                    "id": "x",
                    "object": "chat.completion",
                    "model": body["model"],
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": finish}
                    ],
                    "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110},
                }
                if self._send(200, payload):
                    with teacher.lock:
                        teacher.delivered.append(text)

            def _send(self, status, payload) -> bool:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    if status == 429:
                        self.send_header("Retry-After", "0")
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return True
                except (BrokenPipeError, ConnectionResetError):
                    return False  # the client timed out (or was killed) and left

        self.http = Loopback(Handler)
        self.base_url = self.http.url + "/v1"

    @staticmethod
    def reply(text: str) -> tuple[str, str]:
        if text.startswith("Translate the following text"):
            return "ZH[" + text.split("\n\n", 1)[1] + "]", "stop"
        if text.startswith("### Instruction\n"):
            if "CUE:badscore" in text:
                return "N/A\nI cannot rate this.", "stop"
            return re.search(r"score (\d+)", text)[1] + "\nBecause.", "stop"
        instruction = text.split("### Instruction:\n", 1)[1].split("\n\n", 1)[0]
        if "CUE:empty" in text:
            return "  ", "stop"
        return f"Answer: {instruction}", "length" if "CUE:length" in text else "stop"

    def close(self):
        self.release.set()
        self.http.close()


class BatchServer:
    """/v1/files (upload), /v1/batches (create, retrieve), /v1/files/<id>/content; a batch completes after `polls`
    retrievals, answering every request "Answer: <instruction>" except those whose prompt holds "CUE:fail"."""

    def __init__(self, polls: int = 2):
        self.files, self.batches, self.created, self.polls = {}, {}, 0, polls
        self.lock = threading.Lock()
        server = self

        class Handler(QuietHandler):
            def _send(self, payload, status=200, raw: bytes | None = None):
                data = raw if raw is not None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with server.lock:
                    if self.path == "/v1/files":
                        lines = [line for line in body.split(b"\r\n") if line.startswith(b'{"custom_id"')]
                        lines = [x for chunk in lines for x in chunk.split(b"\n") if x]
                        file_id = f"file-{len(server.files)}"
                        server.files[file_id] = b"\n".join(lines)
                        return self._send(
                            {
                                "id": file_id,
                                "object": "file",
                                "bytes": len(body),
                                "created_at": 0,
                                "filename": "requests.jsonl",
                                "purpose": "batch",
                                "status": "processed",
                            }
                        )
                    if self.path == "/v1/batches":
                        request = json.loads(body)
                        server.created += 1
                        batch_id = f"batch-{server.created}"
                        server.batches[batch_id] = {"input": request["input_file_id"], "polled": 0}
                        return self._send(server.card(batch_id))
                self._send({"error": {"message": "no"}}, 404)

            def do_GET(self):
                with server.lock:
                    if self.path.startswith("/v1/batches/"):
                        batch_id = self.path.rsplit("/", 1)[1]
                        server.batches[batch_id]["polled"] += 1
                        return self._send(server.card(batch_id))
                    if self.path.startswith("/v1/files/") and self.path.endswith("/content"):
                        return self._send(None, raw=server.files[self.path.split("/")[3]])
                self._send({"error": {"message": "no"}}, 404)

        self.http = Loopback(Handler)
        self.base_url = self.http.url + "/v1"

    def card(self, batch_id: str) -> dict:
        batch = self.batches[batch_id]
        done = batch["polled"] >= self.polls
        output = None
        if done:
            answers = []
            for line in self.files[batch["input"]].splitlines():
                request = json.loads(line)
                prompt = request["body"]["messages"][-1]["content"]
                ok = "CUE:fail" not in prompt
                body = {
                    "id": "x",
                    "object": "chat.completion",
                    "created": 0,
                    "model": request["body"]["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {
                                "role": "assistant",
                                "content": "Answer: " + prompt.split("Instruction:\n")[1].split("\n")[0],
                            },
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
                }
                if request["body"].get("logprobs"):  # as OpenAI's: the first token's top alternatives
                    top = [{"token": "m", "logprob": -0.25}, {"token": "M", "logprob": -1.5}]
                    body["choices"][0]["logprobs"] = {
                        "content": [{"token": "m", "logprob": -0.25, "top_logprobs": top}]
                    }
                answers.append(
                    {
                        "id": "r",
                        "custom_id": request["custom_id"],
                        "response": {"status_code": 200 if ok else 500, "body": body if ok else {}},
                        "error": None,
                    }
                )
            output = f"file-{len(self.files)}"
            self.files[output] = "\n".join(json.dumps(a) for a in answers).encode()
            batch["output"] = output
        return {
            "id": batch_id,
            "object": "batch",
            "endpoint": "/v1/chat/completions",
            "input_file_id": batch["input"],
            "completion_window": "24h",
            "status": "completed" if done else "in_progress",
            "created_at": 0,
            "output_file_id": batch.get("output"),
            "request_counts": {"total": 3, "completed": 3 if done else 0, "failed": 0},
        }

    def close(self):
        self.http.close()


class FileServer:
    """Serves `body` at /data.json; the first `cuts` requests are cut off halfway through the file."""

    def __init__(self, body: bytes, cuts: int = 0):
        self.body, self.cuts, self.requests = body, cuts, 0
        server = self

        class Handler(QuietHandler):
            def do_GET(self):
                server.requests += 1
                if self.path != "/data.json":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()
                if server.requests <= server.cuts:
                    self.wfile.write(server.body[: len(server.body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(server.body)

        self.http = Loopback(Handler)
        self.url = self.http.url + "/data.json"

    def close(self):
        self.http.close()
