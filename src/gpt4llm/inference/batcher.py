"""The one thread that runs the model for `gpt4llm.serve`: requests wait as jobs, and are answered through the
generation engine (models.engine) with continuous batching.

The worker takes the oldest waiting job and those that came with it (up to `max_batch` jobs), and runs them; while
they run, every job that arrives joins the running batch as rows free up (a job of n choices takes n rows), so a
request never waits for another's long answer. Each job has its own max_tokens, stop strings, sampling settings and
seed; a streamed job's tokens go to its streamer as they come. A job whose client left is dropped while it waits, and
its generation stops at the next token.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from gpt4llm.inference.openai_protocol import RequestError
from gpt4llm.models.decoding import request_seed, stop_ids
from gpt4llm.models.engine import EOS, STOP, Engine, Request, Sampling

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
    seed: int | None = None  # the request's seed; None: a random one
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


class Batcher:
    """The one thread that runs the model: takes waiting jobs and answers them through the engine."""

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
        # rows join as soon as one is free: a request's wait matters more than a prefill's cost here
        self.engine = Engine(model, tokenizer, stop_ids(model, tokenizer), max_rows=self.max_batch, join_at=1)
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

    def _take(self) -> bool:
        """Waits until jobs are pending (True) or the batcher is closed (False)."""
        with self.cond:
            while True:
                while not self.pending and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return False
                if self.batch_wait > 0 and len(self.pending) < self.max_batch:
                    # A moment for requests sent together to arrive together; under load the queue is full anyway.
                    self.cond.wait_for(
                        lambda: len(self.pending) >= self.max_batch or self.closed, timeout=self.batch_wait
                    )
                # Looked at again after the wait: the jobs waited for may have been cancelled meanwhile (their clients
                # hung up), down to none at all.
                if self.closed:
                    return False
                if self.pending:
                    return True

    def cancel(self, job: Job) -> None:
        """A job whose client left: dropped if still waiting, stopped if running."""
        job.cancelled.set()
        with self.cond:
            if job in self.pending:
                self.pending.remove(job)
                job.finish()

    def alive(self) -> bool:
        """Whether the worker still takes jobs (`/health` says 503 when not)."""
        return self.thread.is_alive() and not self.closed

    def _loop(self) -> None:
        while self._take():
            running = _Running(self)
            try:
                self._run(running)
            except Exception as err:  # a bug around generation fails the running requests, never the worker
                log.exception("generation failed for %d requests", len(running.taken))
                self._fail(running.taken, err)

    def _run(self, running: _Running) -> None:
        self.batches += 1
        started = time.perf_counter()
        for index, completion in self.engine.run(
            running.join(self.max_batch), running.on_token, running.cancelled, more=running.join
        ):
            running.done(index, completion)
        self.jobs_done += running.finished
        log.debug("%d requests in %.3fs", running.finished, time.perf_counter() - started)

    @staticmethod
    def _fail(batch: list[Job], err: BaseException) -> None:
        for job in batch:
            if not job.done.is_set():
                job.error = err
                if job.streamer is not None:
                    job.streamer.end()  # wakes the handler waiting on the stream
                job.finish()


class _Running:
    """The jobs of one engine run: which request (row) is whose choice, and what each job got so far."""

    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher
        self.jobs: dict[int, Job] = {}  # request index -> its job
        self.choice: dict[int, int] = {}  # request index -> its choice number in the job
        self.answers: dict[int, list[Choice | None]] = {}  # id(job) -> its choices so far
        self.taken: list[Job] = []  # every job this run took from the queue (failed together if the run fails)
        self.next = self.finished = 0

    def join(self, free: int) -> list[Request]:
        """Pending jobs that fit in `free` rows, as requests (a job that cannot be set up fails alone)."""
        b = self.batcher
        taken: list[Request] = []
        with b.cond:
            # a job of n choices may take more rows than are free: the engine runs its other choices as rows free up
            while b.pending and len(taken) < free and not b.closed:
                job = b.pending.popleft()
                self.taken.append(job)
                try:
                    requests = self.requests(job)
                except Exception as err:
                    log.exception("a request could not be set up")
                    b._fail([job], err)
                    continue
                for k in range(len(requests)):
                    self.jobs[self.next], self.choice[self.next] = job, k
                    self.next += 1
                taken += requests
                self.answers[id(job)] = [None] * job.n
                b.largest_batch = max(b.largest_batch, len({id(j) for j in self.jobs.values() if not j.done.is_set()}))
        return taken

    def requests(self, job: Job) -> list[Request]:
        b = self.batcher
        ids = tuple(b.tokenizer(job.prompt, add_special_tokens=b.add_special_tokens)["input_ids"])
        sampling = None if job.sampling is None else Sampling(job.sampling[0], job.sampling[1])
        seed = random.getrandbits(62) if job.seed is None else job.seed
        return [Request(ids, job.max_tokens, sampling, request_seed(seed, "", k), job.stop) for k in range(job.n)]

    def on_token(self, index: int, token: int) -> None:
        job = self.jobs[index]
        if job.streamer is not None and not job.cancelled.is_set():
            try:
                job.streamer.put(torch.tensor([token]))
            except Exception:  # its stream is gone (the event loop closed): it stops, the others go on
                log.exception("a stream could not take its tokens")
                job.cancelled.set()

    def cancelled(self, index: int) -> bool:
        return self.jobs[index].cancelled.is_set()

    def done(self, index: int, completion) -> None:
        job = self.jobs[index]
        answers = self.answers[id(job)]
        answers[self.choice[index]] = self.choice_of(completion)
        del self.jobs[index], self.choice[index]
        if all(a is not None for a in answers):
            del self.answers[id(job)]
            job.choices = answers
            if job.streamer is not None:
                job.streamer.end()
            job.finish()
            self.finished += 1

    def choice_of(self, completion) -> Choice:
        reason = "stop" if completion.finish_reason in (EOS, STOP) else "length"
        if completion.finish_reason == STOP:  # usage counts the tokens of what is sent, not of what followed
            tokens = len(self.batcher.tokenizer(completion.text, add_special_tokens=False)["input_ids"])
            return Choice(completion.text, reason, tokens)
        return Choice(completion.text, reason, completion.num_tokens)
