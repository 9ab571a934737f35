"""A small client for any OpenAI-compatible chat-completions endpoint (OpenAI, Azure-style proxies, vLLM, our own
server), with what a long paid job needs: bounded retries with exponential backoff, a concurrency limit, and an
on-disk answer cache, so that a rerun pays for nothing twice.

    client = ChatClient("https://api.openai.com/v1", "gpt-4", cache_path="data/cache/chat/answers.jsonl",
                        prices={"prompt": 0.03, "completion": 0.06})
    result = client.chat([{"role": "user", "content": "Hi"}], temperature=0.2, max_tokens=64)
    result.text, result.finish_reason, result.usage, client.estimated_cost()

Only the standard library is used (urllib), so no SDK pins our dependencies. The API key is read from the
environment variable the caller names, sent in the Authorization header, and never logged, cached, or put in an
error message. Nothing here knows what the answers are for: judging, synthesis and scoring build their prompts and
read the text themselves.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger(__name__)

# Worth retrying: rate limits, server-side failures and gateways timing out. Other 4xx are the request's fault.
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504, 520, 522, 524, 529}


class ChatError(RuntimeError):
    """A request that failed for good: a non-retryable status, or retries exhausted. Never contains the key."""


@dataclass(frozen=True)
class ChatResult:
    text: str
    finish_reason: str | None
    usage: dict[str, Any]
    cached: bool = False  # True when the answer came from the on-disk cache (nothing was sent)


@dataclass
class ClientStats:
    """What a run cost: requests sent (each retry counts), answers read from the cache, retries, token usage.

    `prompt_tokens`/`completion_tokens` are the tokens paid for in this run (answers received); the `cached_*` ones
    are the usage recorded with the answers the cache returned instead, i.e. what the cache saved."""

    sent: int = 0
    cached: int = 0
    retried: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in vars(self).items() if k != "lock"}


EMPTY_REPLY_RETRIES = 2


class TooFewSucceeded(RuntimeError):
    """A run whose requests mostly failed: its outputs are written, and its exit status says it is incomplete."""


def check_success(succeeded: int, asked: int, min_fraction: float, what: str, rerun: str) -> None:
    """Raises TooFewSucceeded when nothing, or less than `min_fraction`, succeeded; `min_fraction` 0 checks nothing."""
    if asked and min_fraction > 0 and (succeeded == 0 or succeeded / asked < min_fraction):
        raise TooFewSucceeded(
            f"only {succeeded} of {asked} {what} succeeded (below {min_fraction:.0%}); what did is written and cached: "
            f"{rerun}"
        )


class AnswerCache:
    """JSON lines of {"key", "text", "finish_reason", "usage"}; appended one whole line per answer and flushed, so a
    killed run keeps every answer it received and a torn last line is ignored on the next start."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.entries: dict[str, dict] = {}
        if self.path.exists():
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                        self.entries[entry["key"]] = entry
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a line torn by a kill: that answer is asked for again
        self._terminate_torn_line()

    def _terminate_torn_line(self) -> None:
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")  # the next answer starts on a line of its own

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, entry: dict) -> None:
        entry = {"key": key, **entry}
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with self.lock:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            self.entries[key] = entry


class ChatClient:
    """Chat completions from `base_url` (the part before `/chat/completions`, e.g. https://api.openai.com/v1)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        cache_path: str | Path | None = None,
        timeout: float = 120.0,
        max_retries: int = 6,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        concurrency: int = 4,
        prices: dict[str, float] | None = None,
    ):
        """`prices`: US$ per 1,000 tokens, {"prompt": ..., "completion": ...}, for `estimated_cost` (None: unknown)."""
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.base_url, self.model, self.api_key_env = base_url.rstrip("/"), model, api_key_env
        self.timeout, self.max_retries, self.backoff, self.max_backoff = timeout, max_retries, backoff, max_backoff
        self.concurrency = max(1, concurrency)
        self.cache = AnswerCache(cache_path) if cache_path else None
        self.stats = ClientStats()
        self.cancelled = threading.Event()  # set when a chat_many is interrupted: in-flight requests stop retrying
        self.prices = dict(prices) if prices else None
        if self.prices and set(self.prices) - {"prompt", "completion"}:
            raise ValueError(f"prices={self.prices}: expected the keys 'prompt' and 'completion' (US$ per 1K tokens)")

    def estimated_cost(self, cached: bool = False) -> float | None:
        """US$ for the tokens paid in this run (`cached=True`: for those the cache saved), from `prices`."""
        if not self.prices:
            return None
        s = self.stats
        if cached:
            prompt, completion = s.cached_prompt_tokens, s.cached_completion_tokens
        else:
            prompt, completion = s.prompt_tokens, s.completion_tokens
        return (prompt * self.prices.get("prompt", 0.0) + completion * self.prices.get("completion", 0.0)) / 1000

    def cache_key(self, messages: list[dict], params: dict, sample: int) -> str:
        # The key is not part of it: the same request with another key is the same question.
        body = {"base_url": self.base_url, "model": self.model, "messages": messages, "params": params, "sample": sample}
        return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def chat(self, messages: list[dict[str, str]], sample: int = 0, **params) -> ChatResult:
        """One chat completion. `params` are sent as they are (temperature, max_tokens, top_p, seed, ...).

        `sample` tells apart repeated draws of the same request: the cache keeps one answer per (request, sample),
        so asking for sample=1 pays for a fresh answer once, and every rerun gets the same one back.
        """
        key = self.cache_key(messages, params, sample)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            usage = hit.get("usage") or {}
            with self.stats.lock:
                self.stats.cached += 1
                self.stats.cached_prompt_tokens += int(usage.get("prompt_tokens") or 0)
                self.stats.cached_completion_tokens += int(usage.get("completion_tokens") or 0)
            return ChatResult(hit["text"], hit.get("finish_reason"), usage, cached=True)
        for _ in range(1 + EMPTY_REPLY_RETRIES):  # an empty reply is a failure of the moment: asked again
            reply = self._post({"model": self.model, "messages": messages, **params})
            try:
                choice = reply["choices"][0]
                text = choice["message"].get("content") or ""
            except (KeyError, IndexError, TypeError, AttributeError) as err:
                raise ChatError(f"{self.url}: unexpected reply layout ({str(reply)[:300]})") from err
            usage = reply.get("usage") or {}
            with self.stats.lock:
                self.stats.prompt_tokens += int(usage.get("prompt_tokens") or 0)
                self.stats.completion_tokens += int(usage.get("completion_tokens") or 0)
            if text.strip():
                break
        result = ChatResult(text, choice.get("finish_reason"), usage)
        if self.cache is not None and text.strip():  # never an empty reply: a rerun asks for it again
            self.cache.put(key, {"text": text, "finish_reason": result.finish_reason, "usage": usage})
        return result

    def chat_many(self, requests: Iterable[dict], progress: str | None = None) -> list[ChatResult | ChatError]:
        """`chat(**request)` for each request, `concurrency` at a time, in input order. A request that fails for
        good yields its ChatError in its place instead of stopping the others (whose answers are cached).

        The progress bar (when `progress` names it) shows the tokens paid so far, the estimated cost, and the
        answers taken from the cache. Interrupted (Ctrl-C), the requests not yet started are cancelled and the
        ones in flight finish into the cache, so the rerun finds them."""
        from tqdm.auto import tqdm

        requests = list(requests)
        results: list[ChatResult | ChatError | None] = [None] * len(requests)

        def one(request: dict) -> ChatResult | ChatError:
            try:
                return self.chat(**request)
            except ChatError as err:
                with self.stats.lock:
                    self.stats.failed += 1
                return err

        self.cancelled.clear()
        pool = ThreadPoolExecutor(self.concurrency)
        bar = tqdm(total=len(requests), desc=progress, unit="req", disable=progress is None)
        try:
            futures = {pool.submit(one, request): i for i, request in enumerate(requests)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update(1)
                if progress is not None:
                    bar.set_postfix_str(self.progress_note(), refresh=False)
        except BaseException:
            self.cancelled.set()
            raise
        finally:
            # On an exception (KeyboardInterrupt included) nothing new starts; in-flight requests end in the cache.
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        return results  # type: ignore[return-value]

    def progress_note(self) -> str:
        """'tokens 12.3k, ~$0.41, cached 10, failed 1': what the run has paid, for progress bars and logs."""
        s = self.stats
        note = f"tokens {_short(s.prompt_tokens + s.completion_tokens)}"
        cost = self.estimated_cost()
        if cost is not None:
            note += f", ~${cost:.2f}"
        if s.cached:
            note += f", cached {s.cached}"
        if s.retried:
            note += f", retries {s.retried}"
        if s.failed:
            note += f", failed {s.failed}"
        return note

    def _post(self, body: dict) -> dict:
        data = json.dumps(body, ensure_ascii=False).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        for attempt in range(self.max_retries + 1):
            with self.stats.lock:
                self.stats.sent += 1
            wait: float | None = None
            try:
                request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as err:
                detail = _body_excerpt(err)
                if key:
                    detail = detail.replace(key, "***")  # in case a server echoes what it was sent
                if err.code not in RETRY_STATUS:
                    hint = f" (is ${self.api_key_env} set?)" if err.code in (401, 403) and self.api_key_env else ""
                    raise ChatError(f"{self.url}: HTTP {err.code}{hint}: {detail}") from None
                problem, wait = f"HTTP {err.code}: {detail}", _retry_after(err)
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, http.client.HTTPException) as err:
                problem = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
            except json.JSONDecodeError as err:
                problem = f"reply is not JSON ({err.msg})"
            if attempt == self.max_retries:
                raise ChatError(f"{self.url}: gave up after {attempt + 1} attempts; last: {problem}")
            if self.cancelled.is_set():
                raise ChatError(f"{self.url}: interrupted; last: {problem}")
            delay = min(self.max_backoff, wait if wait is not None else self.backoff * 2**attempt * random.uniform(0.5, 1.0))
            log.warning(f"{self.url}: {problem}; retry {attempt + 1}/{self.max_retries} in {delay:.1f}s")
            with self.stats.lock:
                self.stats.retried += 1
            time.sleep(delay)
        raise AssertionError("unreachable")


def _short(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def _body_excerpt(err: urllib.error.HTTPError) -> str:
    try:
        return err.read()[:300].decode("utf-8", "replace").strip() or err.reason
    except Exception:
        return str(err.reason)


def _retry_after(err: urllib.error.HTTPError) -> float | None:
    """The server's Retry-After in seconds (rate limits say how long to wait), when it sends one."""
    value = err.headers.get("Retry-After") if err.headers else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def client_from_config(block) -> ChatClient:
    """A client from a config block laid out as conf/client/openai.yaml (the teacher's, the judge's)."""
    prices = block.get("prices")
    return ChatClient(
        block.base_url, block.model, api_key_env=block.api_key_env, cache_path=block.cache, timeout=block.timeout,
        max_retries=block.max_retries, backoff=block.backoff, max_backoff=block.max_backoff,
        concurrency=block.concurrency, prices=dict(prices) if prices else None,
    )
