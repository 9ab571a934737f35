"""The one thread that runs the model for `gpt4llm.serve`: requests wait as jobs, and are answered in batches.

The worker takes the oldest waiting job and up to `max_batch - 1` others with the same sampling settings (temperature,
top_p, n), runs one left-padded batched `generate` with the largest max_tokens among them, and cuts each answer to its
own job's max_tokens (the first k tokens do not depend on the limit). Static batching: a batch ends when its longest
answer does. A streamed job runs as a batch of its own (transformers' streamers take one sequence), in turn with the
batches. A job whose client left is dropped while it waits, and its stream's generation stops at the next token.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from gpt4llm.inference.openai_protocol import RequestError
from gpt4llm.models.decoding import generate_completions, truncate_completion

log = logging.getLogger(__name__)


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

    def __init__(
        self,
        model,
        tokenizer,
        max_batch: int = 8,
        batch_wait: float = 0.005,
        max_queue: int = 256,
        add_special_tokens: bool = True,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.add_special_tokens = add_special_tokens  # False for prompts a chat template rendered
        self.max_batch, self.batch_wait, self.max_queue = max(1, max_batch), batch_wait, max_queue
        self.pending: deque[Job] = deque()
        self.cond = threading.Condition()
        self.closed = False
        self.batches = self.largest_batch = self.jobs_done = 0
        self.thread = threading.Thread(target=self._loop, name="gpt4llm-serve-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        if not self.alive():  # nobody would ever answer it
            stopped = "the model worker has stopped: restart the server (its log says why)"
            raise RequestError(503, stopped, code="worker_dead")
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
            while True:
                while not self.pending and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return None
                if not self.pending[0].stream and self.batch_wait > 0 and len(self.pending) < self.max_batch:
                    # A moment for requests sent together to arrive together; under load the queue is full anyway.
                    self.cond.wait_for(
                        lambda: len(self.pending) >= self.max_batch or self.closed, timeout=self.batch_wait
                    )
                # Looked at again after the wait: the jobs waited for may have been cancelled meanwhile (their clients
                # hung up), down to none at all.
                if self.closed:
                    return None
                if not self.pending:
                    continue
                first = self.pending[0]
                if first.stream:
                    return [self.pending.popleft()]
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

    def alive(self) -> bool:
        """Whether the worker still takes jobs (`/health` says 503 when not)."""
        return self.thread.is_alive() and not self.closed

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            try:
                self._run(batch)
            except Exception as err:  # a bug around generation fails this batch's requests, never the worker
                log.exception("a batch of %d failed", len(batch))
                self._fail(batch, err)

    def _run(self, batch: list[Job]) -> None:
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
                self.model,
                self.tokenizer,
                [j.prompt for j in batch],
                max(j.max_tokens for j in batch),
                batch_size=len(batch),
                add_special_tokens=self.add_special_tokens,
                num_samples=first.n,
                **kwargs,
            ):
                for i, samples in zip(rows, completions):
                    batch[i].choices = [self._choice(s, batch[i]) for s in samples]
                    batch[i].finish()
        except Exception as err:  # the batch fails, the server goes on
            log.exception("generation failed for a batch of %d", len(batch))
            self._fail(batch, err)
        self.jobs_done += len(batch)
        log.debug("batch of %d in %.3fs", len(batch), time.perf_counter() - started)

    @staticmethod
    def _fail(batch: list[Job], err: BaseException) -> None:
        for job in batch:
            if not job.done.is_set():
                job.error = err
                if job.streamer is not None:
                    job.streamer.end()  # wakes the handler waiting on the stream
                job.finish()

    def _choice(self, completion, job: Job) -> Choice:
        completion = truncate_completion(self.tokenizer, completion, job.max_tokens)
        text, reason = completion.text, "length" if completion.finish_reason == "length" else "stop"
        cuts = [text.find(s) for s in job.stop if s and s in text]
        if cuts:  # usage counts the tokens of what is sent, not of what was generated past the stop string
            text, reason = text[: min(cuts)], "stop"
            return Choice(text, reason, len(self.tokenizer(text, add_special_tokens=False)["input_ids"]))
        return Choice(text, reason, completion.num_tokens)
