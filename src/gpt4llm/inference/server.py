"""The server behind `python -m gpt4llm.serve model.path=EXPORT`: it answers OpenAI-compatible chat completions with
our model, so `gpt4llm.synthesize`, the judge (`gpt4llm.evaluate metric=judge`) and any OpenAI client can use a model
trained here as they use GPT-4.

    POST /v1/chat/completions   {"model", "messages", "max_tokens", "temperature", "top_p", "n", "stop", "stream"}
    GET  /v1/models             the one model served (its name: model.name, by default served_name's)
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
  head within `request_timeout` seconds closed: see HeaderTimeoutProtocol). Connections without a request in
  progress (just opened, half-sent, idle) may hold half of `max_connections`, and one client address at most
  `max_connections_per_client`: a client that keeps reopening half-sent connections closes its own, and complete
  requests keep the rest (see ConnectionGuard). A client that hangs up is logged in one line; its waiting request is
  dropped, and its stream's generation stops at the next token.
- Security: bound to 127.0.0.1 unless host= says otherwise. When the environment variable named by api_key_env holds
  a key, every request but /health needs `Authorization: Bearer <key>`. The key is never logged.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import itertools
import json
import logging
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import h11
from fastapi import (
    FastAPI,
    Request,  # at module level: FastAPI resolves the endpoints' annotations in this module
)
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from gpt4llm.app.http import WebServer
from gpt4llm.errors import ServerStartError
from gpt4llm.inference.batcher import Batcher, Job
from gpt4llm.inference.openai_protocol import (
    ChatRequest,
    ChunkWriter,
    RequestError,
    chat_prompt,
    completion_body,
    parse_chat_request,
    unauthorized,
    usage,
)
from gpt4llm.models import model_card

log = logging.getLogger(__name__)

MIN_TEMPERATURE = 1e-5  # the lowest temperature sampled at (see the module's docstring)
PEEK_BYTES = 16 * 1024 + 4  # h11's limit on a request head (uvicorn's default), and its blank line


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head (request line and headers) has not all arrived
    `header_timeout` seconds after the connection opened or after its first bytes on a kept-alive connection, and
    telling the server's ConnectionGuard when a connection opens, starts a request, waits again, and closes.

    Why a subclass: uvicorn has no such timeout. Its keep-alive timer starts only after a response and is cancelled by
    any byte received, so a client that sends part of its headers and waits holds its connection for ever; past
    `limit_concurrency` such connections every client gets 503. `h11_max_incomplete_event_size` bounds the size of a
    partial head, not its time, and `timeout_keep_alive` does not apply before a first response. The app cannot help:
    it sees a request only once its head is complete. uvicorn picks h11 without httptools, which gpt4llm does not
    depend on; this pins h11 either way, as the timer needs h11's view of where the request is."""

    def __init__(self, *args, header_timeout: float, guard: ConnectionGuard, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.header_timer = None
        self.guard = guard
        self.address = ""  # the client's address, as the guard counts it
        self.admitted = False  # counted by the guard (until it closes this connection or the connection is lost)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if not self.guard.admit(self):  # its address is at its limit, and none of its connections may be closed
            self.drop()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self.header_timer is None:  # the next request's first bytes
            self._arm()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # its head is complete (or it was refused): the app's from here
            self._disarm()
        self._track()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._track()  # kept alive: waiting for the next request (unless one was pipelined)

    def connection_lost(self, exc) -> None:
        self._disarm()
        self.guard.forget(self)
        super().connection_lost(exc)

    def drop(self) -> None:
        """Closes the connection now, with a reset (nothing of a request was read, and a client that cycles its
        connections leaves no TIME_WAIT behind), and stops counting it towards max_connections at once: its
        connection_lost comes on the loop's next round, and a burst of new connections can close dozens in one round.
        """
        self.connections.discard(self)  # uvicorn's set, by which it answers 503 past limit_concurrency
        self.transport.abort()

    def head_sent(self) -> str:
        """How much of its next request head this connection without a request has sent: "whole" (arrived, not yet
        read by the event loop: a burst of new connections can delay that by many milliseconds), "part" or "none".
        What h11 holds of it, and what the socket holds unread (peeked at, left there)."""
        held, unread = bytes(self.conn.trailing_data[0]), self._peek()
        tail = held[-3:] + unread
        if b"\n\r\n" in tail or b"\n\n" in tail:
            return "whole"
        return "part" if held or unread else "none"

    def _peek(self) -> bytes:
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return b""
        try:
            raw = socket.socket(fileno=sock.fileno())  # the transport's own socket, borrowed: detached, not closed
        except OSError:
            return b""
        try:
            return raw.recv(PEEK_BYTES, socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0))
        except OSError:  # nothing there (BlockingIOError), or the connection is gone
            return b""
        finally:
            raw.detach()

    def _track(self) -> None:
        """Tells the guard whether this connection has a request in progress (h11: the client is past IDLE)."""
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE:
            self.guard.wait(self)
        else:
            self.guard.busy(self)

    def _arm(self) -> None:
        self.header_timer = self.loop.call_later(self.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _too_slow(self) -> None:
        self.header_timer = None
        if not self.transport.is_closing():
            self.guard.note(f"sent no whole request head in {self.header_timeout:g}s")
            self.transport.close()


class ConnectionGuard:
    """Keeps connections without a request in progress (just opened, part of a request head sent, or idle between
    requests) from taking the capacity that requests need, for one server; all its calls come from uvicorn's event
    loop, one at a time.

    - One client address holds at most `per_client` connections. A connection beyond it closes one of that address's
      connections without a request (its victim, below); when it has none to close, the new connection is closed at
      once.
    - Connections without a request hold at most `max_waiting` (half of max_connections) all together. Beyond it the
      victim of the address that holds the most of them is closed (or the new connection, when it has none).
    An address's victim: of its connections without a request, oldest first, the first that has sent part of a
    request head; else the first that has sent nothing. One whose whole head has arrived is never closed, even before
    the event loop has read it (HeaderTimeoutProtocol.head_sent), nor is a connection carrying a request.

    So a client that keeps reopening half-sent connections as they are dropped (issue 11: 30 of 33 real requests got
    503 in 45 s) closes its own connections, even when it shares its address with real clients; never more than half
    of max_connections wait for a request head; and a complete request finds room below max_connections (uvicorn's
    limit_concurrency, beyond which it answers 503). What was closed is logged, at most a line every LOG_EVERY
    seconds."""

    LOG_EVERY = 10.0
    SCAN = 8  # connections looked at for a victim, oldest first: a close costs at most this many peeks (3 µs each)

    def __init__(self, max_connections: int, per_client: int) -> None:
        self.per_client = per_client
        self.max_waiting = max(1, max_connections // 2)
        self.open: Counter[str] = Counter()  # address -> its connections counted
        self.waiting: dict[str, dict[HeaderTimeoutProtocol, float]] = {}  # address -> {connection: since}, oldest first
        self.waiting_count = 0
        self.closed: Counter[str] = Counter()  # why -> connections closed since the last log line
        self.next_log = 0.0

    def admit(self, conn: HeaderTimeoutProtocol) -> bool:
        """Counts a new connection, closing another to make room; False: close it at once."""
        conn.address = conn.client[0] if conn.client else ""
        if self.open[conn.address] >= self.per_client:
            victim = self.victim(conn.address)
            if victim is None:
                self.note(f"over max_connections_per_client={self.per_client} from one address, closed at once")
                return False
            self.evict(victim, f"to stay within max_connections_per_client={self.per_client}")
        self.open[conn.address] += 1
        conn.admitted = True
        self.wait(conn)
        return conn.admitted  # False when it was itself the one closed to stay within max_waiting

    def wait(self, conn: HeaderTimeoutProtocol) -> None:
        """`conn` has no request in progress (from now, unless it had none already)."""
        if not conn.admitted or conn in self.waiting.get(conn.address, ()):
            return
        # Room is made before `conn` is counted, so that waiting_count never exceeds max_waiting, even for a moment
        # another thread (a health probe, a test) could see.
        why = f"to keep half of max_connections for requests ({self.max_waiting})"
        while self.waiting_count >= self.max_waiting:
            # the address holding the most waiting connections, `conn` counted (on a tie, the one whose oldest has
            # waited longest; `conn` itself has waited least)
            now = time.monotonic()
            most = max(
                {*self.waiting, conn.address},
                key=lambda a: (
                    len(self.waiting.get(a, ())) + (a == conn.address),
                    now - next(iter(self.waiting[a].values()), now) if a in self.waiting else 0.0,
                ),
            )
            victim = self.victim(most)
            if victim is None:
                self.evict(conn, why)
                return
            self.evict(victim, why)
        self.waiting.setdefault(conn.address, {})[conn] = time.monotonic()
        self.waiting_count += 1

    def busy(self, conn: HeaderTimeoutProtocol) -> None:
        """`conn` has a request in progress (or is gone)."""
        own = self.waiting.get(conn.address)
        if own is not None and own.pop(conn, None) is not None:
            self.waiting_count -= 1
            if not own:
                del self.waiting[conn.address]

    def forget(self, conn: HeaderTimeoutProtocol) -> None:
        """`conn` is closed."""
        if conn.admitted:
            conn.admitted = False
            self.busy(conn)
            self.open[conn.address] -= 1
            if self.open[conn.address] <= 0:
                del self.open[conn.address]

    def victim(self, address: str) -> HeaderTimeoutProtocol | None:
        """The connection of `address` to close to make room (see the class); None: none of them may be closed."""
        silent = None
        for conn in itertools.islice(self.waiting.get(address, {}), self.SCAN):
            sent = conn.head_sent()
            if sent == "part":
                return conn
            if sent == "none" and silent is None:
                silent = conn
        return silent

    def evict(self, conn: HeaderTimeoutProtocol, why: str) -> None:
        self.forget(conn)
        conn.drop()
        self.note(why)

    def note(self, why: str) -> None:
        """Logs the connections closed, at most one line every LOG_EVERY seconds."""
        self.closed[why] += 1
        now = time.monotonic()
        if now >= self.next_log:
            log.info("closed connections: %s", "; ".join(f"{n} {why}" for why, n in self.closed.items()))
            self.closed.clear()
            self.next_log = now + self.LOG_EVERY


@dataclass(frozen=True)
class ServerSettings:
    """How the server listens, batches and bounds requests: conf/serve.yaml's values (gpt4llm.serve builds them);
    the defaults suit a server started in a test or a benchmark."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port
    api_key: str | None = field(default=None, repr=False)  # when set, requests but /health must send it; never shown
    max_batch: int = 8  # sequences the engine decodes at once (a request of n choices takes n)
    batch_wait: float = 0.005  # seconds an idle worker waits for companions of a first request
    default_max_tokens: int = 256  # when a request gives no max_tokens
    max_tokens_limit: int = 1024  # a request asking for more gets 400
    max_n: int = 8  # choices per request
    max_body_bytes: int = 1 << 20  # larger bodies get 413
    max_queue: int = 256  # requests waiting beyond it get 503
    max_context: int | None = None  # prompt + answer tokens; None: the model's max_position_embeddings
    max_connections: int = 1024  # connections beyond it get a 503 at once; at most half without a request in progress
    max_connections_per_client: int = 64  # from one address; beyond it one of its waiting connections is closed
    idle_timeout: float = 15.0  # idle keep-alive connections are closed after it
    request_timeout: float = 10.0  # seconds a client has to send a request's head, and then its body


class ModelServer(WebServer):
    """The HTTP front: parses and checks requests, hands them to the Batcher, writes the answers."""

    def __init__(self, model, tokenizer, name: str, settings: ServerSettings = ServerSettings(), check_tokenizer=None):
        self.name, self.settings = name, settings
        self.tokenizer = tokenizer
        # Handler threads count prompt tokens with a tokenizer of their own: a Rust tokenizer used from two threads at
        # once can fail ("Already borrowed"), and the worker's is busy generating.
        self.check_tokenizer = check_tokenizer or tokenizer
        self.check_lock = threading.Lock()
        self.max_context = settings.max_context or getattr(model.config, "max_position_embeddings", None) or 2048
        self.created = int(time.time())
        self.guard = ConnectionGuard(settings.max_connections, settings.max_connections_per_client)
        super().__init__(
            settings.host,
            settings.port,
            limit_concurrency=settings.max_connections,  # connections beyond it get a 503 at once
            timeout_keep_alive=settings.idle_timeout,  # idle keep-alive connections are closed after it
            http=functools.partial(HeaderTimeoutProtocol, header_timeout=settings.request_timeout, guard=self.guard),
        )
        # data.formats: how a chat becomes the prompt (the model's card says which it was trained with; else its
        # tokenizer's template), said at start
        self.served = model_card.prompt_format_of(model, tokenizer)
        self.prompt_format = self.served.format
        add_special_tokens = self.prompt_format.add_special_tokens
        self.batcher = Batcher(
            model, tokenizer, settings.max_batch, settings.batch_wait, settings.max_queue, add_special_tokens
        )
        self.base_url = f"http://{settings.host}:{self.port}/v1"

    # -- running ------------------------------------------------------------------------------------------------
    def build_app(self):
        return build_app(self)

    def close(self) -> None:
        super().close()
        self.batcher.close()

    # -- requests -----------------------------------------------------------------------------------------------
    def authorized(self, header: str | None) -> bool:
        if not self.settings.api_key:
            return True
        given = header[7:].strip() if header and header[:7].lower() == "bearer " else ""
        return hmac.compare_digest(given.encode(), self.settings.api_key.encode())

    def model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "gpt4llm"}

    def parse_request(self, body: Any) -> Job:
        """The Job for a request body, or a RequestError saying what is wrong with it (checked in this order: the
        model, the messages, n, max_tokens, the prompt's length)."""
        request = parse_chat_request(body)
        self.check_model(request.model)
        with self.check_lock:
            prompt = chat_prompt(self.prompt_format, self.check_tokenizer, request.messages)
        n = self.choices(request)
        max_tokens = self.max_tokens(request)
        prompt_tokens = self.prompt_tokens(prompt)
        return Job(
            prompt,
            prompt_tokens,
            min(max_tokens, self.max_context - prompt_tokens),
            n,
            sampling(request),
            tuple(request.stop_strings()),
            bool(request.stream),
            seed=request.seed,
            include_usage=request.include_usage(),
        )

    def check_model(self, model: str | None) -> None:
        """A 404 for a model other than the one served (a request that names none gets it)."""
        if model is not None and model != self.name:
            unknown = f"The model '{model}' does not exist; this server serves '{self.name}'"
            raise RequestError(404, unknown, "model", "model_not_found")

    def choices(self, request: ChatRequest) -> int:
        n = 1 if request.n is None else request.n
        if not 1 <= n <= self.settings.max_n:
            raise RequestError(400, f"'n' must be between 1 and {self.settings.max_n}", "n")
        return n

    def max_tokens(self, request: ChatRequest) -> int:
        """The answer's token limit: max_completion_tokens (OpenAI's newer name) or max_tokens, else the default."""
        key = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        limit = self.settings.max_tokens_limit
        max_tokens = getattr(request, key)
        max_tokens = self.settings.default_max_tokens if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= limit:
            raise RequestError(400, f"'{key}' must be between 1 and {limit}", key)
        return max_tokens

    def prompt_tokens(self, prompt: str) -> int:
        """The prompt's length in tokens; a 400 when it leaves no room for an answer in the model's context."""
        with self.check_lock:
            ids = self.check_tokenizer(prompt, add_special_tokens=self.prompt_format.add_special_tokens)["input_ids"]
        if len(ids) >= self.max_context:
            raise RequestError(
                400,
                f"This model's maximum context length is {self.max_context} tokens; the prompt has {len(ids)}",
                "messages",
                "context_length_exceeded",
            )
        return len(ids)

    def completion(self, job: Job) -> dict:
        used = sum(c.completion_tokens for c in job.choices)
        return completion_body(self.name, [(c.text, c.finish_reason) for c in job.choices], job.prompt_tokens, used)


def sampling(request: ChatRequest) -> tuple[float, float] | None:
    """(temperature, top_p) to sample with, OpenAI's defaults 1.0 and 1.0; None for temperature 0: greedy."""
    temperature = 1.0 if request.temperature is None else request.temperature
    if temperature == 0:
        return None
    top_p = 1.0 if request.top_p is None else request.top_p
    return max(temperature, MIN_TEMPERATURE), top_p


# --- the HTTP layer ------------------------------------------------------------------------------------------------
def build_app(server: ModelServer) -> FastAPI:
    """The HTTP layer (FastAPI on uvicorn); generation is the Batcher's."""
    app = FastAPI(title="gpt4llm serve", docs_url=None, redoc_url=None, openapi_url=None)
    add_error_handlers(app)
    add_health_route(app, server)
    add_model_routes(app, server)
    add_chat_route(app, server)
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Errors in OpenAI's shape, an unknown path's too."""

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


def add_health_route(app: FastAPI, server: ModelServer) -> None:
    """GET /health, without the key: 503 once the model worker has stopped."""

    @app.get("/health")
    async def health():
        if not server.batcher.alive():
            message = "the model worker has stopped: restart the server (its log says why)"
            return JSONResponse({"status": "error", "message": message}, 503)
        return {"status": "ok"}


def add_model_routes(app: FastAPI, server: ModelServer) -> None:
    """GET /v1/models and /v1/models/<name> (and without /v1, as OpenAI answers both): the one model served."""

    @app.get("/v1/models")
    @app.get("/models")
    async def models(request: Request):
        check_key(server, request)
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{name:path}")
    @app.get("/models/{name:path}")
    async def model(name: str, request: Request):
        check_key(server, request)
        if name != server.name:
            raise RequestError(404, f"The model '{name}' does not exist", "model", "model_not_found")
        return server.model_card()


def add_chat_route(app: FastAPI, server: ModelServer) -> None:
    """POST /v1/chat/completions (and without /v1): the body read and checked, then answered whole or streamed."""

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat(request: Request):
        check_key(server, request)
        raw = await read_body(request, server.settings)
        if raw is None:  # the client left while sending it
            return JSONResponse({}, 499)
        job = await run_in_threadpool(server.parse_request, parse_json(raw))  # counts prompt tokens: not on the loop
        finished = notify_when_done(job)
        if job.stream:
            return start_stream(server, job, finished)
        return await answer(server, job, finished, request)


def check_key(server: ModelServer, request: Request) -> None:
    if not server.authorized(request.headers.get("authorization")):
        raise unauthorized()


async def read_body(request: Request, settings: ServerSettings) -> bytes | None:
    """The request's body, sent whole within request_timeout; None when its client left while sending it."""
    check_length(request.headers, settings.max_body_bytes)
    try:
        return await asyncio.wait_for(request.body(), settings.request_timeout)
    except asyncio.TimeoutError:
        raise RequestError(408, f"The body did not arrive within {settings.request_timeout:g}s") from None
    except ClientDisconnect:
        log.info("client left while sending its request")
        return None


def check_length(headers, max_body_bytes: int) -> None:
    """A 411/400/413 for a body without a valid Content-Length, or over max_body_bytes: checked before it is read."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise RequestError(411, "Send the body with a Content-Length (chunked bodies are not accepted)")
    length = headers.get("content-length")
    if length is None or not length.isdigit():
        raise RequestError(411 if length is None else 400, "A valid Content-Length header is required")
    if int(length) > max_body_bytes:
        raise RequestError(413, f"The body is over {max_body_bytes} bytes", code="request_too_large")


def parse_json(raw: bytes) -> Any:
    """The body's JSON; a 400 for what is not JSON, NaN and Infinity included, or nests deeper than Python parses."""
    try:
        return json.loads(raw, parse_constant=_not_json)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, f"The body is not valid JSON ({err})") from None
    except RecursionError:
        raise RequestError(400, "The body is nested too deeply (a chat request is a few levels deep)") from None


def _not_json(constant: str):
    raise RequestError(400, f"The body is not valid JSON: {constant} is not a JSON number")


def notify_when_done(job: Job) -> asyncio.Event:
    """An event set on this event loop when the worker thread finishes the job."""
    loop, finished = asyncio.get_running_loop(), asyncio.Event()
    job.notify = lambda: loop.call_soon_threadsafe(finished.set)
    return finished


async def answer(server: ModelServer, job: Job, finished: asyncio.Event, request: Request):
    """The whole completion once the job is done; a 499 when its client hangs up first (the job is dropped)."""
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
        raise generation_failed(job.error)
    if job.cancelled.is_set():
        raise RequestError(499, "cancelled")
    return server.completion(job)


def generation_failed(error: BaseException) -> RequestError:
    return RequestError(500, f"generation failed: {type(error).__name__}: {error}")


def start_stream(server: ModelServer, job: Job, finished: asyncio.Event) -> StreamingResponse:
    """The job submitted with a streamer its tokens' text comes through, answered as server-sent events."""
    from transformers import AsyncTextIteratorStreamer

    # the engine puts the generated tokens alone (no prompt first, as generate's streamer calls do)
    job.streamer = AsyncTextIteratorStreamer(server.tokenizer, skip_prompt=False, skip_special_tokens=True)
    server.batcher.submit(job)
    return StreamingResponse(
        stream(server, job, finished), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


async def stream(server: ModelServer, job: Job, finished: asyncio.Event):
    """A streamed job's events: the role, the text as it comes, then how it ended and [DONE]. A client that hangs up
    mid-stream stops its generation."""
    events = ChunkWriter(server.name)
    try:
        yield events.chunk({"role": "assistant", "content": ""})
        async for text in text_before_stop(job):
            yield events.chunk({"content": text})
        await finished.wait()
        for event in last_events(job, events):
            yield event
        yield events.DONE
    finally:
        if not job.done.is_set():  # the client hung up mid-stream: stop generating for it
            server.batcher.cancel(job)
            log.info("streaming client left; its generation stopped")


async def text_before_stop(job: Job):
    """The streamed text, cut before the first stop string as without streaming: text that may be the start of a stop
    string is held until it is known not to be."""
    held = ""
    async for text in job.streamer:
        held += text
        cuts = [held.find(s) for s in job.stop if s and s in held]
        if cuts:  # the answer ends before the stop string
            held = held[: min(cuts)]
            job.cancelled.set()  # generation stops at the next token
            break
        keep = max((k for s in job.stop for k in range(1, len(s)) if held.endswith(s[:k])), default=0)
        if len(held) > keep:
            yield held[: len(held) - keep]
            held = held[len(held) - keep :]
    if held:
        yield held


def last_events(job: Job, events: ChunkWriter) -> list[str]:
    """After the text: the error, or the finish reason and, when asked for, the usage."""
    if job.error is not None:
        return [events.error(generation_failed(job.error))]
    choice = job.choices[0]
    last = [events.chunk({}, choice.finish_reason)]
    if job.include_usage:
        last.append(events.chunk(None, usage=usage(job.prompt_tokens, choice.completion_tokens)))
    return last


def load_server(
    path: str,
    name: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    settings: ServerSettings = ServerSettings(),
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
    return ModelServer(model, tokenizer, name or served_name(path, model.config), settings, check_tokenizer=check)


# Our run directories' names, which say nothing about the model: the start time (and process id), or a job number
# (GPT4LLM_RUN_ID from a scheduler, a sweep's job).
RUN_STAMP = re.compile(r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}(_\d+)?|\d+")
TASKS = {"SFTModule": "sft", "DPOModule": "dpo", "RewardModule": "rm"}  # train's task, by its module's class


def served_name(path: str | Path, config=None, depth: int = 0) -> str:
    """The name a model is served under when model.name is not given: what a person listing /v1/models recognizes.

    - a directory other than a training export: its own name (`/models/vicuna-7b`: vicuna-7b);
    - a training export, `<run>/export` (or its `adapter/`): the run's name where a person chose it
      (GPT4LLM_RUN_ID=llama-gpt4, hydra.run.dir); else, the run being named by its start time, what it was trained
      from and how: the base model's name (the export's training record, models.model_card) and the task, e.g.
      `llama-7b-sft`, or `llama-7b-sft-dpo` for a DPO run that started from that SFT export; the run's name when the
      export records no base.
    `config`: the model's config (else read from the export's config.json)."""
    p = Path(str(path).rstrip("/") or ".")
    if p.name == "adapter" and p.parent.name == "export":
        p, config = p.parent, None  # an adapter's config is its base's: the export beside it has the record
    if p.name != "export":
        return p.name or "model"
    run = p.parent
    if run.name and not RUN_STAMP.fullmatch(run.name):
        return run.name
    record = model_card.read(config if config is not None else config_json(p))
    if not record.base_model or depth >= 4:
        return run.name or "model"
    return f"{served_name(record.base_model, depth=depth + 1)}-{trained_task(run)}"


def config_json(export: Path) -> SimpleNamespace:
    """An export's config.json as attributes (what model_card.read reads); empty when it cannot be read."""
    try:
        return SimpleNamespace(**json.loads((export / "config.json").read_text()))
    except (OSError, ValueError, TypeError):
        return SimpleNamespace()


def trained_task(run: Path) -> str:
    """The task a training run trained (sft, dpo, ...), from the config it saved (<run>/.hydra/config.yaml)."""
    from omegaconf import OmegaConf

    try:
        target = str(OmegaConf.load(run / ".hydra" / "config.yaml").task._target_)
    except Exception:  # no saved config (a copied export), or not one of train's
        return "tuned"
    module = target.rsplit(".", 1)[-1]
    return TASKS.get(module, module.removesuffix("Module").lower() or "tuned")
