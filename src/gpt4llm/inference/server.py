"""The server behind `python -m gpt4llm.serve model.path=EXPORT`: it answers OpenAI-compatible chat completions with
our model, so `gpt4llm.synthesize`, the judge (`gpt4llm.evaluate metric=judge`) and any OpenAI client can use a model
trained here as they use GPT-4.

    POST /v1/chat/completions   {"model", "messages", "max_tokens", "temperature", "top_p", "n", "stop", "stream"}
    GET  /v1/models             the one model served (its name: model.name, by default from the export's path)
    GET  /health                {"status": "ok"}, without the key; 503 {"status": "error", ...} once the model worker
                                has stopped (restart the server)

Three parts: the protocol (gpt4llm.inference.openai_protocol: requests as pydantic models, unsupported fields refused
by name, errors in OpenAI's shape, the prompt a chat becomes), the batcher (gpt4llm.inference.batcher: the one thread
that runs the model), and here the HTTP app and what ties them together.

- Decoding: temperature 0 is greedy; otherwise sampling with temperature and top_p (OpenAI's defaults: 1.0, 1.0).
  Temperatures between 0 and MIN_TEMPERATURE sample at MIN_TEMPERATURE (dividing the logits by less overflows them to
  inf; at 1e-5 sampling already picks the greedy token but for near-ties). `stop` strings (a string or up to 4) cut
  the answer, streamed or not, and usage counts the tokens sent.
- Errors: 400 (malformed JSON, NaN/Infinity, nesting deeper than Python parses, lone surrogates, missing or bad fields,
  a prompt longer than the model's context), 401 (key), 404 (unknown path or model), 408 (a body not sent within
  `request_timeout`), 411/413 (no length, body over max_body_bytes), 503 (queue full, clients retry; or the model
  worker stopped). The server keeps serving after each.
- HTTP: FastAPI on uvicorn (a 2048-connection backlog, `max_connections` at once beyond which a 503 comes at once,
  idle keep-alive connections closed after `idle_timeout` seconds, connections that have not sent a whole request
  head within `request_timeout` seconds closed: see HeaderTimeoutProtocol). A client that hangs up is logged in one
  line; its waiting request is dropped, and its stream's generation stops at the next token.
- Security: bound to 127.0.0.1 unless host= says otherwise. When the environment variable named by api_key_env holds
  a key, every request but /health needs `Authorization: Bearer <key>`. The key is never logged.
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import h11
from fastapi import (
    Request,  # at module level: FastAPI resolves the endpoints' annotations in this module
)
from uvicorn.protocols.http.h11_impl import H11Protocol

from gpt4llm.app.http import WebServer
from gpt4llm.app.resolvers import model_name
from gpt4llm.data.templates import render
from gpt4llm.errors import ServerStartError
from gpt4llm.inference.batcher import Batcher, Job
from gpt4llm.inference.openai_protocol import (
    ChunkWriter,
    RequestError,
    completion_body,
    conversation_from_messages,
    parse_chat_request,
    prompt_from_messages,
    unauthorized,
    usage,
)

log = logging.getLogger(__name__)

MIN_TEMPERATURE = 1e-5  # the lowest temperature sampled at (see the module's docstring)


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head (request line and headers) has not all arrived
    `header_timeout` seconds after the connection opened or after its first bytes on a kept-alive connection.

    Why a subclass: uvicorn has no such timeout. Its keep-alive timer starts only after a response and is cancelled by
    any byte received, so a client that sends part of its headers and waits holds its connection for ever; past
    `limit_concurrency` such connections every client gets 503. `h11_max_incomplete_event_size` bounds the size of a
    partial head, not its time, and `timeout_keep_alive` does not apply before a first response. The app cannot help:
    it sees a request only once its head is complete. uvicorn picks h11 without httptools, which gpt4llm does not
    depend on; this pins h11 either way, as the timer needs h11's view of where the request is."""

    def __init__(self, *args, header_timeout: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.header_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self.header_timer is None:  # the next request's first bytes
            self._arm()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # its head is complete (or it was refused): the app's from here
            self._disarm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self.header_timer = self.loop.call_later(self.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _too_slow(self) -> None:
        self.header_timer = None
        if not self.transport.is_closing():
            log.info("closed a connection that sent no whole request head in %gs", self.header_timeout)
            self.transport.close()


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
        request_timeout: float = 10.0,
    ):
        self.name, self.api_key = name, api_key or None
        self.tokenizer = tokenizer
        # Handler threads count prompt tokens with a tokenizer of their own: a Rust tokenizer used from two threads at
        # once can fail ("Already borrowed"), and the worker's is busy generating.
        self.check_tokenizer = check_tokenizer or tokenizer
        self.check_lock = threading.Lock()
        self.default_max_tokens, self.max_tokens_limit, self.max_n = default_max_tokens, max_tokens_limit, max_n
        self.max_body_bytes, self.request_timeout = max_body_bytes, request_timeout
        self.max_context = max_context or getattr(model.config, "max_position_embeddings", None) or 2048
        self.created = int(time.time())
        super().__init__(
            host,
            port,
            limit_concurrency=max_connections,  # connections beyond it get a 503 at once
            timeout_keep_alive=int(idle_timeout),  # idle keep-alive connections are closed after it
            http=functools.partial(HeaderTimeoutProtocol, header_timeout=request_timeout),
        )
        # data.templates: how a chat becomes the prompt (the model's export says which it was trained with)
        self.template = getattr(model.config, "gpt4llm_template", "alpaca")
        self.batcher = Batcher(model, tokenizer, max_batch, batch_wait, max_queue, self.template == "alpaca")
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
        request = parse_chat_request(body)
        if request.model is not None and request.model != self.name:
            unknown = f"The model '{request.model}' does not exist; this server serves '{self.name}'"
            raise RequestError(404, unknown, "model", "model_not_found")
        if self.template == "alpaca":  # the last user message in the paper's prompt, as the model was trained
            prompt = prompt_from_messages(body["messages"])
        else:  # the whole conversation, through the template the model was trained with
            conversation = conversation_from_messages(body["messages"])
            with self.check_lock:
                prompt = render(self.check_tokenizer, [conversation], add_generation_prompt=True)[0]
        n = 1 if request.n is None else request.n
        if not 1 <= n <= self.max_n:
            raise RequestError(400, f"'n' must be between 1 and {self.max_n}", "n")
        key = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        max_tokens = getattr(request, key)
        max_tokens = self.default_max_tokens if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= self.max_tokens_limit:
            raise RequestError(400, f"'{key}' must be between 1 and {self.max_tokens_limit}", key)
        with self.check_lock:
            prompt_tokens = len(self.check_tokenizer(prompt, add_special_tokens=self.template == "alpaca")["input_ids"])
        if prompt_tokens >= self.max_context:
            raise RequestError(
                400,
                f"This model's maximum context length is {self.max_context} tokens; the prompt has {prompt_tokens}",
                "messages",
                "context_length_exceeded",
            )
        temperature = 1.0 if request.temperature is None else request.temperature
        if temperature > 0:
            temperature = max(temperature, MIN_TEMPERATURE)
        top_p = 1.0 if request.top_p is None else request.top_p
        stop = [request.stop] if isinstance(request.stop, str) else request.stop or []
        options = request.stream_options
        include_usage = options is not None and options.include_usage is True
        return Job(
            prompt,
            prompt_tokens,
            min(max_tokens, self.max_context - prompt_tokens),
            n,
            None if temperature == 0 else (temperature, top_p),
            tuple(stop),
            bool(request.stream),
            include_usage=include_usage,
        )

    def completion(self, job: Job) -> dict:
        used = sum(c.completion_tokens for c in job.choices)
        return completion_body(self.name, [(c.text, c.finish_reason) for c in job.choices], job.prompt_tokens, used)


def build_app(server: ModelServer):
    """The HTTP layer (FastAPI on uvicorn); generation is the Batcher's."""
    import asyncio

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect

    app = FastAPI(title="gpt4llm serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError):
        # 408: the rest of that body may still come; the connection cannot be read on, so it is closed
        headers = {"Retry-After": "1"} if err.status == 503 else {"Connection": "close"} if err.status == 408 else None
        return JSONResponse(err.body(), err.status, headers=headers)

    @app.exception_handler(404)
    async def unknown_path(request: Request, err):
        return JSONResponse(
            RequestError(404, f"Unknown path {request.url.path}: POST /v1/chat/completions or GET /v1/models").body(),
            404,
        )

    def check_key(request: Request) -> None:
        if not server.authorized(request.headers.get("authorization")):
            raise unauthorized()

    @app.get("/health")
    async def health():
        if not server.batcher.alive():
            message = "the model worker has stopped: restart the server (its log says why)"
            return JSONResponse({"status": "error", "message": message}, 503)
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
            raw = await asyncio.wait_for(request.body(), server.request_timeout)
        except asyncio.TimeoutError:
            raise RequestError(408, f"The body did not arrive within {server.request_timeout:g}s") from None
        except ClientDisconnect:
            log.info("client left while sending its request")
            return JSONResponse({}, 499)
        try:
            body = json.loads(raw, parse_constant=_not_json)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RequestError(400, f"The body is not valid JSON ({err})") from None
        except RecursionError:
            raise RequestError(400, "The body is nested too deeply (a chat request is a few levels deep)") from None
        job = await run_in_threadpool(server.parse_request, body)  # counts prompt tokens: not on the event loop
        loop, finished = asyncio.get_running_loop(), asyncio.Event()
        job.notify = lambda: loop.call_soon_threadsafe(finished.set)
        if job.stream:
            from transformers import AsyncTextIteratorStreamer

            job.streamer = AsyncTextIteratorStreamer(server.tokenizer, skip_prompt=True, skip_special_tokens=True)
            server.batcher.submit(job)
            return StreamingResponse(
                stream(job, finished), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
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
        events = ChunkWriter(server.name)
        held = ""  # text that may be the start of a stop string: sent once it is known not to be
        try:
            yield events.chunk({"role": "assistant", "content": ""})
            async for text in job.streamer:
                held += text
                cuts = [held.find(s) for s in job.stop if s and s in held]
                if cuts:  # the answer ends before the stop string, as without streaming
                    held = held[: min(cuts)]
                    job.cancelled.set()  # generation stops at the next token
                    break
                keep = max((k for s in job.stop for k in range(1, len(s)) if held.endswith(s[:k])), default=0)
                if len(held) > keep:
                    yield events.chunk({"content": held[: len(held) - keep]})
                    held = held[len(held) - keep :]
            if held:
                yield events.chunk({"content": held})
            await finished.wait()
            if job.error is not None:
                yield events.error(RequestError(500, f"generation failed: {type(job.error).__name__}: {job.error}"))
            else:
                choice = job.choices[0]
                yield events.chunk({}, choice.finish_reason)
                if job.include_usage:
                    yield events.chunk(None, usage=usage(job.prompt_tokens, choice.completion_tokens))
            yield events.DONE
        finally:
            if not job.done.is_set():  # the client hung up mid-stream: stop generating for it
                server.batcher.cancel(job)
                log.info("streaming client left; its generation stopped")

    return app


def _not_json(constant: str):
    raise RequestError(400, f"The body is not valid JSON: {constant} is not a JSON number")


def load_server(
    path: str, name: str | None = None, dtype: str | None = None, device: str | None = None, **options
) -> ModelServer:
    """A ModelServer for a model directory (an export of `gpt4llm.train`, or any local Hugging Face causal LM)."""
    import torch

    if not Path(path).is_dir():
        raise ServerStartError(f"model.path={path}: no such directory (a training run's export is <run dir>/export)")
    from gpt4llm.data.tokenizer import load_tokenizer
    from gpt4llm.models.hf import load_causal_lm

    tokenizer = load_tokenizer(str(path), padding_side="left")
    model = load_causal_lm(str(path), tokenizer, dtype=dtype)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    check = load_tokenizer(str(path), padding_side="left")
    return ModelServer(model, tokenizer, name or model_name(str(path)), check_tokenizer=check, **options)
