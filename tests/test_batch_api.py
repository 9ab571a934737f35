"""synthesize through OpenAI's Batch API, against a local server speaking the Batch API's endpoints (files, batches,
file content) with the official `openai` client: submitted once, resumed by polling after a kill, answers cached."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from test_synthesize import synth_cfg, write


class BatchServer:
    """/v1/files (upload), /v1/batches (create, retrieve), /v1/files/<id>/content; a batch completes after `polls`
    retrievals, answering every request "Answer: <instruction>" except those whose prompt holds "CUE:fail"."""

    def __init__(self, polls: int = 2):
        self.files, self.batches, self.created, self.polls = {}, {}, 0, polls
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
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
                        return self._send({"id": file_id, "object": "file", "bytes": len(body), "created_at": 0,
                                           "filename": "requests.jsonl", "purpose": "batch", "status": "processed"})
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

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

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
                body = {"id": "x", "object": "chat.completion", "created": 0, "model": request["body"]["model"],
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Answer: " + prompt.split("Instruction:\n")[1].split("\n")[0]},
                                     "finish_reason": "stop"}], "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}}
                answers.append({"id": "r", "custom_id": request["custom_id"],
                                "response": {"status_code": 200 if ok else 500, "body": body if ok else {}}, "error": None})
            output = f"file-{len(self.files)}"
            self.files[output] = "\n".join(json.dumps(a) for a in answers).encode()
            batch["output"] = output
        return {"id": batch_id, "object": "batch", "endpoint": "/v1/chat/completions", "input_file_id": batch["input"],
                "completion_window": "24h", "status": "completed" if done else "in_progress", "created_at": 0,
                "output_file_id": batch.get("output"), "request_counts": {"total": 3, "completed": 3 if done else 0, "failed": 0}}

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("SYNTH_TEST_KEY", "sk-test")


def test_synthesize_through_the_batch_api(tmp_path, key, monkeypatch):
    import gpt4llm.synthesize as S
    from gpt4llm.inference import openai_client

    server = BatchServer(polls=3)
    try:
        seed = write(tmp_path / "seed.json", [{"instruction": "Say hi.", "input": ""}, {"instruction": "CUE:fail now.", "input": ""},
                                              {"instruction": "Say bye.", "input": ""}])
        cfg = synth_cfg(tmp_path, server.base_url, "job=answer", f"instructions={seed}", "teacher.batch=true",
                        "teacher.batch_poll_seconds=0.01")

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
