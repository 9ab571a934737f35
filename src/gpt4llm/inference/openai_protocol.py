"""The OpenAI chat-completions protocol as `gpt4llm.serve` speaks it: the request as pydantic models, the one place
that refuses fields this server does not honour (by name), errors in OpenAI's shape, and the response bodies.

Everything here is pure (no model, no HTTP): gpt4llm.inference.server turns a checked request into a job for the
batcher (gpt4llm.inference.batcher) and the finished job into a response with the functions at the end.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gpt4llm.data.formats import FormatProblem, PromptFormat

ROLES = ("system", "developer", "user", "assistant", "tool")
ERROR_TYPES = {401: "authentication_error", 500: "server_error", 503: "server_error"}
# user: OpenAI's end-user id, for their abuse monitoring; nothing to do here
SUPPORTED = {
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "user",
}
# Fields accepted when they ask for nothing (a client library sending its defaults); any other value is refused.
NEUTRAL = {
    "logprobs": (None, False),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "parallel_tool_calls": (None, True, False),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
}


class RequestError(Exception):
    """A request answered with an error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = ERROR_TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def unauthorized() -> RequestError:
    return RequestError(401, "Incorrect or missing API key (Authorization: Bearer <key>)", code="invalid_api_key")


# --- the request ---------------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    # strict: "9" is not a number and true is not 1; extra fields are refused by name in refuse_unsupported instead
    model_config = ConfigDict(strict=True, extra="allow")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        """The text: a string, or the joined text parts."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(_Strict):
    include_usage: bool | None = None


class ChatRequest(_Strict):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    seed: int | None = None  # the same seed, settings and prompt give the same sampled answer

    def stop_strings(self) -> list[str]:
        """`stop` as a list (OpenAI takes one string or a list)."""
        return [self.stop] if isinstance(self.stop, str) else self.stop or []

    def include_usage(self) -> bool:
        """Whether a stream ends with a chunk holding the usage (stream_options.include_usage)."""
        return self.stream_options is not None and self.stream_options.include_usage is True


def refuse_unsupported(body: dict) -> None:
    """A 400 naming the first field this server does not honour (logprobs, tools, response_format, ...)."""
    unsupported = sorted(k for k, v in body.items() if k not in SUPPORTED and v not in NEUTRAL.get(k, (None,)))
    if unsupported:
        raise RequestError(
            400,
            f"not supported by this server: {', '.join(unsupported)} (it supports: {', '.join(sorted(SUPPORTED))})",
            unsupported[0],
            "unsupported_parameter",
        )


def parse_chat_request(body: Any) -> ChatRequest:
    """The request, or a RequestError whose `param` names the field at fault."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be a JSON object, not a JSON {type(body).__name__}")
    refuse_lone_surrogates(body)  # first: the other errors quote names and text, which must encode as UTF-8
    refuse_unsupported(body)
    try:
        request = ChatRequest.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        param = _param(first["loc"])
        raise RequestError(400, f"'{param}': {first['msg']}", param) from None
    for i, message in enumerate(request.messages):
        if message.content is None and message.role != "assistant":  # only an assistant turn may come without text
            raise RequestError(
                400, f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content"
            )
    if len(request.stop_strings()) > 4:
        raise RequestError(400, "'stop' must be a string or a list of up to 4 strings", "stop")
    if request.n is not None and request.n > 1 and request.temperature == 0:
        raise RequestError(400, "'n' > 1 needs temperature > 0: greedy answers would all be the same", "n")
    if request.stream and (request.n or 1) > 1:
        raise RequestError(400, "streaming answers one choice at a time: use n=1", "n")
    return request


def refuse_lone_surrogates(body: dict) -> None:
    """A 400 naming the first key or string holding a lone surrogate ("\\ud800"): JSON's escapes can spell one,
    Python's json reads it, but it is not Unicode text: neither the tokenizer nor a UTF-8 answer can hold it."""
    stack: list[tuple[str, Any]] = [(str(k), v) for k, v in reversed(body.items())]  # (path, value), depth first
    while stack:  # not recursive: any depth json.loads accepts is walked
        path, value = stack.pop()
        for text in (path, value) if isinstance(value, str) else (path,):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                name = path.encode("utf-8", "backslashreplace").decode()
                bad = err.object[err.start : err.end].encode("utf-8", "backslashreplace").decode()
                raise RequestError(
                    400, f"'{name}' is not valid Unicode: it holds a lone surrogate ({bad}); send UTF-8 text", name
                ) from None
        if isinstance(value, dict):
            stack += [(f"{path}.{k}", v) for k, v in reversed(value.items())]
        elif isinstance(value, list):
            stack += [(f"{path}[{i}]", v) for i, v in reversed(list(enumerate(value)))]


def _param(loc: tuple) -> str:
    """pydantic's error location as the request's field: messages[2].content, max_tokens, ..."""
    if loc and loc[0] == "messages" and len(loc) > 1 and isinstance(loc[1], int):
        return f"messages[{loc[1]}]" + (".content" if len(loc) > 2 and loc[2] == "content" else "")
    return str(loc[0]) if loc else "body"


def chat_prompt(prompt_format: PromptFormat, tokenizer, messages: list[Message]) -> str:
    """The prompt a chat's messages (a parsed request's) are answered from, as the model's prompt format builds it
    (data.formats): the paper's Alpaca prompt around the last user message, or the whole conversation through a chat
    template (a developer message is a system one). A RequestError naming what does not fit."""
    conversation = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    try:
        return prompt_format.chat_prompt(tokenizer, conversation)
    except FormatProblem as problem:
        raise RequestError(400, str(problem), "messages") from None


# --- the responses -------------------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}


def completion_body(model: str, choices: list[tuple[str, str]], prompt_tokens: int, completion_tokens: int) -> dict:
    """A chat.completion for (text, finish_reason) choices."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason, "logprobs": None}
            for i, (text, reason) in enumerate(choices)
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


class ChunkWriter:
    """The server-sent events of one streamed completion: `data: {chat.completion.chunk}` lines, then `[DONE]`."""

    def __init__(self, model: str) -> None:
        self.model, self.ident, self.created = model, f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(self, delta: dict | None, finish: str | None = None, **extra) -> str:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        body = {
            "id": self.ident,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    @staticmethod
    def error(err: RequestError) -> str:
        return f"data: {json.dumps(err.body())}\n\n"

    DONE = "data: [DONE]\n\n"
