"""A small client for any OpenAI-compatible chat-completions endpoint (OpenAI, Azure-style proxies, vLLM, our own
server), with what a long paid job needs: bounded retries with exponential backoff, a concurrency limit, and an
on-disk answer cache, so that a rerun pays for nothing twice.

    client = ChatClient("https://api.openai.com/v1", "gpt-4", cache_path="data/cache/chat/answers.jsonl",
                        prices={"prompt": 0.03, "completion": 0.06})
    result = client.chat([{"role": "user", "content": "Hi"}], temperature=0.2, max_tokens=64)
    result.text, result.finish_reason, result.usage, client.estimated_cost()

Requests go through the official `openai` SDK (its HTTP client, connection pooling, proxies, typed errors); the
retry loop is ours, on top of the SDK with its own retries off, because a long paid job wants what the SDK's does not
give: retries that a Ctrl-C cancels, counted in the progress bar, with the backoff the config sets (Retry-After
honoured). The API key is read from the environment variable the caller names, sent in the Authorization header, and
never logged, cached, or put in an error message. Nothing here knows what the answers are for: judging, synthesis and
scoring build their prompts and read the text themselves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt4llm.errors import ConfigError, TooFewSucceeded
from gpt4llm.io import json_files

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
    logprobs: dict | None = None  # the choice's logprobs, when the request asked for them (AlpacaEval's weighted judge)


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
        self._openai = None  # the SDK client, made on first use
        # OpenAI's Batch API instead of live requests (half the price, answers within 24 h): chat_many submits what the
        # cache lacks as one batch, keeps its id under this directory (a rerun polls it, nothing is paid twice).
        self.batch_dir: Path | None = None
        self.batch_poll_seconds = 30.0
        if self.prices and set(self.prices) - {"prompt", "completion"}:
            raise ConfigError(f"prices={self.prices}: expected the keys 'prompt' and 'completion' (US$ per 1K tokens)")

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
        body = {
            "base_url": self.base_url,
            "model": self.model,
            "messages": messages,
            "params": params,
            "sample": sample,
        }
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
            return ChatResult(hit["text"], hit.get("finish_reason"), usage, cached=True, logprobs=hit.get("logprobs"))
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
        result = ChatResult(text, choice.get("finish_reason"), usage, logprobs=choice.get("logprobs"))
        if self.cache is not None and text.strip():  # never an empty reply: a rerun asks for it again
            entry = {"text": text, "finish_reason": result.finish_reason, "usage": usage}
            self.cache.put(key, entry | ({"logprobs": result.logprobs} if result.logprobs else {}))
        return result

    def chat_batch(self, requests: list[dict], progress: str | None = None) -> list[ChatResult | ChatError]:
        """`chat_many` through the Batch API: the requests the cache lacks go in one batch, submitted once (its id is
        kept in `batch_dir`, named by those requests, so a rerun after a kill polls the same batch), polled until it
        ends; its answers go into the cache. A request the batch did not answer is a ChatError: a rerun asks again."""
        keys = [
            self.cache_key(
                r["messages"], {k: v for k, v in r.items() if k not in ("messages", "sample")}, r.get("sample", 0)
            )
            for r in requests
        ]
        missing = {k: r for k, r in zip(keys, requests) if self.cache is None or self.cache.get(k) is None}
        failures: dict[str, str] = {}
        if missing:
            state = (
                self.batch_dir / f"batch-{hashlib.sha256(json.dumps(sorted(missing)).encode()).hexdigest()[:16]}.json"
            )
            batch_id = json.loads(state.read_text())["batch_id"] if state.exists() else None
            if batch_id is None:
                lines = [
                    {
                        "custom_id": k,
                        "method": "POST",
                        "url": "/v1/chat/completions",
                        "body": {
                            "model": self.model,
                            "messages": r["messages"],
                            **{p: v for p, v in r.items() if p not in ("messages", "sample")},
                        },
                    }
                    for k, r in missing.items()
                ]
                data = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()
                uploaded = self._sdk().files.create(file=("requests.jsonl", data), purpose="batch")
                batch_id = (
                    self._sdk()
                    .batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
                    .id
                )
                json_files.write_json(state, {"batch_id": batch_id, "requests": len(lines)}, indent=None)
                log.info(f"{progress or 'batch'}: submitted {len(lines)} requests as batch {batch_id}")
            while (batch := self._sdk().batches.retrieve(batch_id)).status not in (
                "completed",
                "failed",
                "expired",
                "cancelled",
            ):
                counts = batch.request_counts
                log.info(
                    f"batch {batch_id}: {batch.status}"
                    + (f", {counts.completed}/{counts.total} done" if counts else "")
                )
                time.sleep(self.batch_poll_seconds)
            if batch.output_file_id:
                for line in self._sdk().files.content(batch.output_file_id).text.splitlines():
                    item = json.loads(line)
                    response = item.get("response") or {}
                    body = response.get("body") or {}
                    try:
                        text = body["choices"][0]["message"].get("content") or ""
                    except (KeyError, IndexError, TypeError, AttributeError):
                        text = ""
                    if response.get("status_code") == 200 and text.strip() and self.cache is not None:
                        usage = body.get("usage") or {}
                        with self.stats.lock:
                            self.stats.sent += 1
                            self.stats.prompt_tokens += int(usage.get("prompt_tokens") or 0)
                            self.stats.completion_tokens += int(usage.get("completion_tokens") or 0)
                        choice = body["choices"][0]
                        entry = {"text": text, "finish_reason": choice.get("finish_reason"), "usage": usage}
                        # log-probabilities kept as the live path keeps them (AlpacaEval's weighted judge reads them)
                        self.cache.put(
                            item["custom_id"], entry | ({"logprobs": lp} if (lp := choice.get("logprobs")) else {})
                        )
                    else:
                        failures[item["custom_id"]] = str(item.get("error") or response)[:200]
            state.unlink(missing_ok=True)  # answered or not, this batch is done; a rerun submits what is still missing
            if batch.status != "completed":
                log.warning(f"batch {batch_id} ended {batch.status}; the answers it has are kept")
        results: list[ChatResult | ChatError] = []
        for key, request in zip(keys, requests):
            if self.cache is not None and self.cache.get(key) is not None:
                results.append(self.chat(**request))  # from the cache
            else:
                with self.stats.lock:
                    self.stats.failed += 1
                results.append(ChatError(f"batch: no answer ({failures.get(key, 'not in the batch output')})"))
        return results

    def chat_many(self, requests: Iterable[dict], progress: str | None = None) -> list[ChatResult | ChatError]:
        """`chat(**request)` for each request, `concurrency` at a time, in input order. A request that fails for
        good yields its ChatError in its place instead of stopping the others (whose answers are cached).

        The progress bar (when `progress` names it) shows the tokens paid so far, the estimated cost, and the
        answers taken from the cache. Interrupted (Ctrl-C), the requests not yet started are cancelled and the
        ones in flight finish into the cache, so the rerun finds them."""
        from tqdm.auto import tqdm

        requests = list(requests)
        if self.batch_dir is not None:
            return self.chat_batch(requests, progress)
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

    def _sdk(self):
        if self._openai is None:
            import openai

            key = os.environ.get(self.api_key_env) if self.api_key_env else None
            # Retries are ours (above); the SDK's are off. A server without auth ignores the placeholder key.
            self._openai = openai.OpenAI(
                base_url=self.base_url, api_key=key or "no-key", timeout=self.timeout, max_retries=0
            )
        return self._openai

    def _post(self, body: dict) -> dict:
        import openai

        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        params = {k: v for k, v in body.items() if k not in ("model", "messages")}
        for attempt in range(self.max_retries + 1):
            with self.stats.lock:
                self.stats.sent += 1
            wait: float | None = None
            try:
                completion = self._sdk().chat.completions.create(
                    model=body["model"], messages=body["messages"], extra_body=params
                )
                if not hasattr(completion, "model_dump"):  # a body the SDK could not read as a completion
                    raise ValueError(str(completion)[:200])
                return completion.model_dump()
            except openai.APIStatusError as err:
                detail = str(err.body if err.body is not None else err.message)[:300]
                if key:
                    detail = detail.replace(key, "***")  # in case a server echoes what it was sent
                if err.status_code not in RETRY_STATUS:
                    hint = (
                        f" (is ${self.api_key_env} set?)" if err.status_code in (401, 403) and self.api_key_env else ""
                    )
                    raise ChatError(f"{self.url}: HTTP {err.status_code}{hint}: {detail}") from None
                problem, wait = f"HTTP {err.status_code}: {detail}", _retry_after(err.response.headers)
            except (openai.APITimeoutError, openai.APIConnectionError) as err:
                problem = f"{type(err).__name__}: {err}"
            except (openai.APIResponseValidationError, json.JSONDecodeError, ValueError) as err:
                problem = f"reply is not a chat completion ({str(err)[:200]})"
            if attempt == self.max_retries:
                raise ChatError(f"{self.url}: gave up after {attempt + 1} attempts; last: {problem}")
            if self.cancelled.is_set():
                raise ChatError(f"{self.url}: interrupted; last: {problem}")
            delay = min(
                self.max_backoff, wait if wait is not None else self.backoff * 2**attempt * random.uniform(0.5, 1.0)
            )
            log.warning(f"{self.url}: {problem}; retry {attempt + 1}/{self.max_retries} in {delay:.1f}s")
            with self.stats.lock:
                self.stats.retried += 1
            time.sleep(delay)
        raise AssertionError("unreachable")


def _short(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def _retry_after(headers) -> float | None:
    """The server's Retry-After in seconds (rate limits say how long to wait), when it sends one."""
    value = headers.get("Retry-After") if headers else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def client_from_config(block) -> ChatClient:
    """A client from a config block laid out as conf/client/openai.yaml (the teacher's, the judge's)."""
    prices = block.get("prices")
    client = ChatClient(
        block.base_url,
        block.model,
        api_key_env=block.api_key_env,
        cache_path=block.cache,
        timeout=block.timeout,
        max_retries=block.max_retries,
        backoff=block.backoff,
        max_backoff=block.max_backoff,
        concurrency=block.concurrency,
        prices=dict(prices) if prices else None,
    )
    if block.get("batch"):
        client.batch_dir = Path(block.cache).parent / "batches"
        client.batch_poll_seconds = float(block.get("batch_poll_seconds", 30))
    return client
