"""The server behind `python -m gpt4llm.serve model.path=EXPORT`: it answers OpenAI-compatible chat completions with our model.

    POST /v1/chat/completions   {"model", "messages", "max_tokens", "temperature", "top_p", "n", "stop", "stream"}
    GET  /v1/models             the one model served (its name: model.name, by default from the export's path)
    GET  /health                {"status": "ok"}, without the key

so `gpt4llm.synthesize`, the judge (`gpt4llm.evaluate metric=judge`) and any OpenAI client can use a model trained
here as they use GPT-4.

- Prompt: the chat becomes the Alpaca prompt the model was trained on (`prompt_from_messages`): the last user message
  is the instruction. A user message that already is an Alpaca prompt (what `gpt4llm.synthesize job=answer` sends)
  is used as it is. System messages and earlier turns are not part of the prompt: the model only ever saw single-turn
  Alpaca prompts, whose fixed preamble stands in for a system prompt.
- Batching: one worker thread owns the model. Requests queue up; the worker takes the oldest and up to `max_batch - 1`
  others waiting with the same sampling settings (temperature, top_p, n) and runs one left-padded batched `generate`
  with the largest max_tokens among them; each answer is then cut to its own request's max_tokens (the first k tokens
  do not depend on the limit). Static batching: a batch ends when its longest answer does.
- Streaming (`"stream": true`): server-sent events, `data: {chat.completion.chunk}` lines and `data: [DONE]`. A streamed
  request runs as a batch of its own (transformers' streamers take one sequence), in turn with the batches.
- Decoding: temperature 0 is greedy; otherwise sampling with temperature and top_p (OpenAI's defaults: 1.0, 1.0).
  `stop` strings cut the answer (not with streaming: refused), and usage counts the tokens sent. Any other OpenAI field
  (logprobs, tools, response_format, seed, penalties, ...) is refused with a 400 that names it, unless it asks for
  nothing (logprobs false, penalties 0); `user` is accepted.
- Errors: OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with 400 (malformed JSON, missing or bad
  fields, a prompt longer than the model's context), 401 (key), 404 (unknown path or model), 411/413 (no length,
  body over max_body_bytes), 503 (queue full; clients retry). The server keeps serving after each.
- HTTP: FastAPI on uvicorn (a 2048-connection backlog, `max_connections` at once beyond which a 503 comes at once,
  idle keep-alive connections closed after `idle_timeout` seconds). A client that hangs up is logged in one line; its
  waiting request is dropped, and its stream's generation stops at the next token.
- Security: bound to 127.0.0.1 unless host= says otherwise. When the environment variable named by api_key_env holds
  a key, every request but /health needs `Authorization: Bearer <key>`. The key is never logged.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import (
    Request,  # at module level: FastAPI resolves the endpoints' annotations in this module
)

from gpt4llm.app.http import ServerStartError, WebServer
from gpt4llm.app.resolvers import model_name
from gpt4llm.data.prompts import alpaca_prompt

log = logging.getLogger(__name__)

ROLES = {"system", "developer", "user", "assistant", "tool"}
ERROR_TYPES = {401: "authentication_error", 500: "server_error", 503: "server_error"}
SUPPORTED = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "stream",
             "stream_options", "user"}  # user: OpenAI's end-user id, for their abuse monitoring; nothing to do here
# Fields accepted when they ask for nothing (a client library sending its defaults); any other value is refused.
NEUTRAL = {"logprobs": (None, False), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
           "parallel_tool_calls": (None, True, False), "tools": (None, []), "tool_choice": (None, "none", "auto")}


class RequestError(Exception):
    """A request answered with an error in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = ERROR_TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def unauthorized() -> RequestError:
    return RequestError(401, "Incorrect or missing API key (Authorization: Bearer <key>)", code="invalid_api_key")


def message_text(message: dict, index: int) -> str:
    """A message's text: a string, or OpenAI's list of content parts ({"type": "text", "text": ...})."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    if content is None and message.get("role") == "assistant":
        return ""
    where = f"messages[{index}].content"
    raise RequestError(400, f"{where} must be a string or a list of text parts", where)


def prompt_from_messages(messages: Any) -> str:
    """The Alpaca prompt for a chat: the last user message as the instruction, or, when that message already is an
    Alpaca prompt, the message itself (ending in '### Response:'). Raises RequestError for a malformed `messages`."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    texts = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            problem = f"messages[{i}] must be an object with a role in {sorted(ROLES)} and a content"
            raise RequestError(400, problem, f"messages[{i}]")
        texts.append((m["role"], message_text(m, i)))
    users = [text for role, text in texts if role == "user"]
    if not users:
        raise RequestError(400, "'messages' has no user message: the last user message is the instruction", "messages")
    text = users[-1]
    if not text.strip():
        raise RequestError(400, "the last user message is empty", "messages")
    return alpaca_prompt(text)


@dataclass
class Choice:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    completion_tokens: int


@dataclass
class Job:
    """One chat request on its way through the batching worker."""

    prompt: str
    prompt_tokens: int
    max_tokens: int
    n: int = 1
    sampling: tuple[float, float] | None = None  # (temperature, top_p); None: greedy
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    streamer: Any = None
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)  # its client left: stop generating
    notify: Any = None  # called (from the worker thread) when the job is done
    choices: list[Choice] | None = None
    error: BaseException | None = None

    def finish(self) -> None:
        self.done.set()
        if self.notify is not None:
            self.notify()

    def key(self) -> tuple:
        """Requests with the same key can share a batch (max_tokens may differ: answers are cut per request)."""
        return (self.sampling, self.n)


class Batcher:
    """The one thread that runs the model: takes waiting jobs in batches and answers them."""

    def __init__(self, model, tokenizer, max_batch: int = 8, batch_wait: float = 0.005, max_queue: int = 256):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.batch_wait, self.max_queue = max(1, max_batch), batch_wait, max_queue
        self.pending: deque[Job] = deque()
        self.cond = threading.Condition()
        self.closed = False
        self.batches = self.largest_batch = self.jobs_done = 0
        self.thread = threading.Thread(target=self._loop, name="gpt4llm-serve-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.cond:
            if len(self.pending) >= self.max_queue:
                busy = f"the server is busy ({len(self.pending)} requests waiting); retry later"
                raise RequestError(503, busy, code="overloaded")
            self.pending.append(job)
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.thread.join(timeout=10)

    def _take(self) -> list[Job] | None:
        with self.cond:
            while not self.pending and not self.closed:
                self.cond.wait()
            if self.closed:
                return None
            first = self.pending[0]
            if first.stream:
                return [self.pending.popleft()]
            if self.batch_wait > 0 and len(self.pending) < self.max_batch:
                # A moment for requests sent together to arrive together; under load the queue is full anyway.
                self.cond.wait_for(lambda: len(self.pending) >= self.max_batch or self.closed, timeout=self.batch_wait)
            batch = [j for j in self.pending if not j.stream and j.key() == first.key()][: self.max_batch]
            for job in batch:
                self.pending.remove(job)
            return batch

    def cancel(self, job: Job) -> None:
        """A job whose client left: dropped if still waiting, stopped if streaming."""
        job.cancelled.set()
        with self.cond:
            if job in self.pending:
                self.pending.remove(job)
                job.finish()

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        from gpt4llm.inference.generation import generate_completions

        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        first = batch[0]
        kwargs: dict[str, Any] = {}
        if first.sampling is not None:
            kwargs |= {"do_sample": True, "temperature": first.sampling[0], "top_p": first.sampling[1]}
        if first.stream:
            from transformers import StoppingCriteria, StoppingCriteriaList

            class ClientLeft(StoppingCriteria):  # a streaming client that hung up stops its generation at once
                def __call__(self, input_ids, scores, **kw):
                    return first.cancelled.is_set()

            kwargs |= {"streamer": first.streamer, "stopping_criteria": StoppingCriteriaList([ClientLeft()])}
        started = time.perf_counter()
        try:
            for rows, completions in generate_completions(
                self.model, self.tokenizer, [j.prompt for j in batch], max(j.max_tokens for j in batch),
                batch_size=len(batch), num_samples=first.n, **kwargs,
            ):
                for i, samples in zip(rows, completions):
                    batch[i].choices = [self._choice(s, batch[i]) for s in samples]
                    batch[i].finish()
        except Exception as err:  # the batch fails, the server goes on
            log.exception("generation failed for a batch of %d", len(batch))
            for job in batch:
                if not job.done.is_set():
                    job.error = err
                    if job.streamer is not None:
                        job.streamer.end()  # wakes the handler waiting on the stream
                    job.finish()
        self.jobs_done += len(batch)
        log.debug("batch of %d in %.3fs", len(batch), time.perf_counter() - started)

    def _choice(self, completion, job: Job) -> Choice:
        from gpt4llm.inference.generation import truncate_completion

        completion = truncate_completion(self.tokenizer, completion, job.max_tokens)
        text, reason = completion.text, "length" if completion.finish_reason == "length" else "stop"
        cuts = [text.find(s) for s in job.stop if s and s in text]
        if cuts:  # usage counts the tokens of what is sent, not of what was generated past the stop string
            text, reason = text[: min(cuts)], "stop"
            return Choice(text, reason, len(self.tokenizer(text, add_special_tokens=False)["input_ids"]))
        return Choice(text, reason, completion.num_tokens)


class ModelServer(WebServer):
    """The HTTP front: parses and checks requests, hands them to the Batcher, writes the answers."""

    def __init__(
        self,
        model,
        tokenizer,
        name: str,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        check_tokenizer=None,
        max_batch: int = 8,
        batch_wait: float = 0.005,
        default_max_tokens: int = 256,
        max_tokens_limit: int = 1024,
        max_n: int = 8,
        max_body_bytes: int = 1 << 20,
        max_queue: int = 256,
        max_context: int | None = None,
        max_connections: int = 1024,
        idle_timeout: float = 15.0,
    ):
        self.name, self.api_key = name, api_key or None
        self.tokenizer = tokenizer
        # Handler threads count prompt tokens with a tokenizer of their own: a Rust tokenizer used from two threads at
        # once can fail ("Already borrowed"), and the worker's is busy generating.
        self.check_tokenizer = check_tokenizer or tokenizer
        self.check_lock = threading.Lock()
        self.default_max_tokens, self.max_tokens_limit, self.max_n = default_max_tokens, max_tokens_limit, max_n
        self.max_body_bytes = max_body_bytes
        self.max_context = max_context or getattr(model.config, "max_position_embeddings", None) or 2048
        self.created = int(time.time())
        super().__init__(
            host, port,
            limit_concurrency=max_connections,  # connections beyond it get a 503 at once
            timeout_keep_alive=int(idle_timeout),  # idle keep-alive connections are closed after it
        )
        self.batcher = Batcher(model, tokenizer, max_batch, batch_wait, max_queue)
        self.base_url = f"http://{host}:{self.port}/v1"

    # -- running ------------------------------------------------------------------------------------------------
    def build_app(self):
        return build_app(self)

    def close(self) -> None:
        super().close()
        self.batcher.close()

    # -- requests -----------------------------------------------------------------------------------------------
    def authorized(self, header: str | None) -> bool:
        if self.api_key is None:
            return True
        given = header[7:].strip() if header and header[:7].lower() == "bearer " else ""
        return hmac.compare_digest(given.encode(), self.api_key.encode())

    def model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "gpt4llm"}

    def parse_request(self, body: Any) -> Job:
        """The Job for a request body, or a RequestError saying what is wrong with it."""
        if not isinstance(body, dict):
            raise RequestError(400, f"the request body must be a JSON object, not a JSON {type(body).__name__}")
        unsupported = sorted(k for k, v in body.items() if k not in SUPPORTED and v not in NEUTRAL.get(k, (None,)))
        if unsupported:
            raise RequestError(400, f"not supported by this server: {', '.join(unsupported)} (it supports: "
                               f"{', '.join(sorted(SUPPORTED))})", unsupported[0], "unsupported_parameter")
        model = body.get("model")
        if model is not None and model != self.name:
            unknown = f"The model '{model}' does not exist; this server serves '{self.name}'"
            raise RequestError(404, unknown, "model", "model_not_found")
        prompt = prompt_from_messages(body.get("messages"))
        stream = _typed(body, "stream", bool, False)
        n = _typed(body, "n", int, 1)
        if not 1 <= n <= self.max_n:
            raise RequestError(400, f"'n' must be between 1 and {self.max_n}", "n")
        temperature = float(_typed(body, "temperature", (int, float), 1.0))
        top_p = float(_typed(body, "top_p", (int, float), 1.0))
        if not 0 <= temperature <= 2:
            raise RequestError(400, "'temperature' must be between 0 and 2", "temperature")
        if not 0 < top_p <= 1:
            raise RequestError(400, "'top_p' must be in (0, 1]", "top_p")
        if n > 1 and temperature == 0:
            raise RequestError(400, "'n' > 1 needs temperature > 0: greedy answers would all be the same", "n")
        if stream and n > 1:
            raise RequestError(400, "streaming answers one choice at a time: use n=1", "n")
        stop = body.get("stop")
        stop = (stop,) if isinstance(stop, str) else stop
        if stop is not None and not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)):
            raise RequestError(400, "'stop' must be a string or a list of up to 4 strings", "stop")
        if stream and stop:
            raise RequestError(400, "'stop' is not supported with streaming on this server", "stop")
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _typed(body, key, int, self.default_max_tokens)
        if not 1 <= max_tokens <= self.max_tokens_limit:
            raise RequestError(400, f"'{key}' must be between 1 and {self.max_tokens_limit}", key)
        with self.check_lock:
            prompt_tokens = len(self.check_tokenizer(prompt)["input_ids"])
        if prompt_tokens >= self.max_context:
            raise RequestError(
                400, f"This model's maximum context length is {self.max_context} tokens; the prompt has {prompt_tokens}",
                "messages", "context_length_exceeded",
            )
        options = body.get("stream_options")
        job = Job(
            prompt, prompt_tokens, min(max_tokens, self.max_context - prompt_tokens), n,
            None if temperature == 0 else (temperature, top_p), tuple(stop or ()), stream,
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        )
        return job

    def completion(self, job: Job) -> dict:
        used = sum(c.completion_tokens for c in job.choices)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                 "logprobs": None}
                for i, c in enumerate(job.choices)
            ],
            "usage": _usage(job.prompt_tokens, used),
        }


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}


def _typed(body: dict, name: str, kind, default):
    """body[name] when it has the type (bool is not a number here), the default when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        expected = {bool: "boolean", int: "integer"}.get(kind, "number")
        raise RequestError(400, f"'{name}' must be a {expected}, not {json.dumps(value)[:40]}", name)
    return value


def build_app(server: ModelServer):
    """The HTTP layer (FastAPI on uvicorn); generation is the Batcher's."""
    import asyncio

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="gpt4llm serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError):
        return JSONResponse(err.body(), err.status, headers={"Retry-After": "1"} if err.status == 503 else None)

    @app.exception_handler(404)
    async def unknown_path(request: Request, err):
        return JSONResponse(RequestError(404, f"Unknown path {request.url.path}: POST /v1/chat/completions or "
                                              "GET /v1/models").body(), 404)

    def check_key(request: Request) -> None:
        if not server.authorized(request.headers.get("authorization")):
            raise unauthorized()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    @app.get("/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{name:path}")
    @app.get("/models/{name:path}")
    async def model(name: str, request: Request):
        check_key(request)
        if name != server.name:
            raise RequestError(404, f"The model '{name}' does not exist", "model", "model_not_found")
        return server.model_card()

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat(request: Request):
        check_key(request)
        if "chunked" in request.headers.get("transfer-encoding", "").lower():
            raise RequestError(411, "Send the body with a Content-Length (chunked bodies are not accepted)")
        length = request.headers.get("content-length")
        if length is None or not length.isdigit():
            raise RequestError(411 if length is None else 400, "A valid Content-Length header is required")
        if int(length) > server.max_body_bytes:
            raise RequestError(413, f"The body is over {server.max_body_bytes} bytes", code="request_too_large")
        try:
            body = json.loads(await request.body())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RequestError(400, f"The body is not valid JSON ({err})") from None
        job = await run_in_threadpool(server.parse_request, body)  # counts prompt tokens: not on the event loop
        loop, finished = asyncio.get_running_loop(), asyncio.Event()
        job.notify = lambda: loop.call_soon_threadsafe(finished.set)
        if job.stream:
            from transformers import AsyncTextIteratorStreamer

            job.streamer = AsyncTextIteratorStreamer(server.tokenizer, skip_prompt=True, skip_special_tokens=True)
            server.batcher.submit(job)
            return StreamingResponse(stream(job, finished), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        server.batcher.submit(job)
        while not finished.is_set():
            try:
                await asyncio.wait_for(finished.wait(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():  # nobody to answer: not worth the model's time
                    server.batcher.cancel(job)
                    log.info("client left before its answer; request dropped")
                    return JSONResponse({}, 499)
        if job.error is not None:
            raise RequestError(500, f"generation failed: {type(job.error).__name__}: {job.error}")
        if job.cancelled.is_set():
            raise RequestError(499, "cancelled")
        return server.completion(job)

    async def stream(job: Job, finished):
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict | None, finish: str | None = None, **extra) -> str:
            choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
            body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": server.name,
                    "choices": choices, **extra}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            async for text in job.streamer:
                if text:
                    yield chunk({"content": text})
            await finished.wait()
            if job.error is not None:
                error = RequestError(500, f"generation failed: {type(job.error).__name__}: {job.error}").body()
                yield f"data: {json.dumps(error)}\n\n"
            else:
                choice = job.choices[0]
                yield chunk({}, choice.finish_reason)
                if job.include_usage:
                    yield chunk(None, usage=_usage(job.prompt_tokens, choice.completion_tokens))
            yield "data: [DONE]\n\n"
        finally:
            if not job.done.is_set():  # the client hung up mid-stream: stop generating for it
                server.batcher.cancel(job)
                log.info("streaming client left; its generation stopped")

    return app


def load_server(
    path: str, name: str | None = None, dtype: str | None = None, device: str | None = None, **options
) -> ModelServer:
    """A ModelServer for a model directory (an export of `gpt4llm.train`, or any local Hugging Face causal LM)."""
    import torch

    if not Path(path).is_dir():
        raise ServerStartError(f"model.path={path}: no such directory (a training run's export is <run dir>/export)")
    from gpt4llm.models.hf import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(str(path), padding_side="left")
    model = load_causal_lm(str(path), tokenizer, dtype=dtype)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    check = load_tokenizer(str(path), padding_side="left")
    return ModelServer(model, tokenizer, name or model_name(str(path)), check_tokenizer=check, **options)
