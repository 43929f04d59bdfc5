"""The scheduler in front of the engine: one worker thread owns the engine and runs every generation.

This one is for architectures without ragged batched steps (serve.batched.BatchScheduler, continuous
batching, serves the others and shares this queue, its 429s and its jobs): there the engine runs one
sequence per forward pass, so requests cannot be batched into one forward. Instead up to `max_concurrency`
admitted generations are interleaved token by token, each with its own KV cache: a new request gets
its first token after one round instead of after every earlier request has finished. Requests past
that wait in FIFO order; past `max_concurrency + max_queue` the server answers 429 at once.

A cancelled job (its client went away) is dropped at the worker's next visit, i.e. within one token
step, and its KV cache is freed with its generator.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from typing import Any, Callable

from hetero.runtime.stops import apply_stops
from hetero.serve.mailbox import Mailbox

END = object()  # sentinel pushed after the last record of a job


class Busy(Exception):
    """Every running and waiting place is taken."""


class Job:
    """One generation: `kwargs` go to Engine.stream; records come back in `out` (serve.mailbox)."""

    def __init__(self, kwargs: dict, loop: asyncio.AbstractEventLoop, priority: bool = False,
                 stop: list[str] | None = None):
        self.kwargs, self.loop, self.priority, self.stop = kwargs, loop, priority, stop or []
        self.prompt_tokens = 0
        self.prompt_ids: list[int] | None = None  # tokenised by the handler (serve.batched needs them)
        self.rid: int | None = None               # its request id in a BatchRunner (serve.batched)
        self.reply = None                         # its serve.replies.Reply while batched
        self.checked_at = 0.0  # when the server last checked that this job's client is still connected
        self.out = Mailbox(loop)
        self.cancelled = threading.Event()
        self.gen = None
        self.t_submit = time.perf_counter()
        self.t_start: float | None = None
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.tokens = 0
        self.scheduler: "Scheduler | None" = None

    def cancel(self) -> None:
        if not self.cancelled.is_set():
            self.cancelled.set()
            if self.scheduler is not None:
                self.scheduler.wake()

    def _emit(self, item: Any) -> None:
        self.out.put(item)


class Scheduler:
    """Owns the engine; `submit` jobs from the event loop, read their records from `job.out`."""

    def __init__(self, engine: Any, max_concurrency: int = 8, max_queue: int = 64,
                 on_token: Callable[[Job, float], None] | None = None,
                 on_done: Callable[[Job, str], None] | None = None):
        if max_concurrency < 1 or max_queue < 0:
            raise ValueError("max_concurrency must be ≥ 1 and max_queue ≥ 0")
        self.engine, self.max_concurrency, self.max_queue = engine, max_concurrency, max_queue
        self.on_token, self.on_done = on_token, on_done
        # The engine's model and its tokenizer are not safe to use from two threads at once: everything that
        # touches them (a generation step, tokenising a prompt) holds this lock.
        self.model_lock = threading.Lock()
        self.cv = threading.Condition()
        self.waiting: deque[Job] = deque()
        self.active: list[Job] = []
        self.stopping = False
        self.thread: threading.Thread | None = None

    # ---- event-loop side -------------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="hetero-scheduler", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)

    def wake(self) -> None:
        with self.cv:
            self.cv.notify_all()

    def submit(self, job: Job) -> None:
        """Queue a job; raise Busy when every place is taken (priority jobs, e.g. /health, never are)."""
        with self.cv:
            live = sum(not j.cancelled.is_set() for j in self.waiting) + len(self.active)
            if not job.priority and live >= self.max_concurrency + self.max_queue:
                raise Busy()
            job.scheduler = self
            if job.priority:
                self.waiting.appendleft(job)
            else:
                self.waiting.append(job)
            self.cv.notify_all()

    def counts(self) -> tuple[int, int]:
        """(running, waiting) right now."""
        with self.cv:
            return len(self.active), sum(not j.cancelled.is_set() for j in self.waiting)

    def tokenize(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` (which uses the tokenizer) while no generation step is running."""
        with self.model_lock:
            return fn()

    # ---- worker side -----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.cv:
                for j in [j for j in self.waiting if j.cancelled.is_set()]:
                    self.waiting.remove(j)
                    self._finish(j, "cancelled")
                while self.waiting and (len(self.active) < self.max_concurrency or self.waiting[0].priority):
                    self.active.append(self.waiting.popleft())
                if self.stopping:
                    break
                if not self.active:
                    self.cv.wait()
                    continue
                round_ = list(self.active)
            for job in round_:
                self._step(job)
        for job in list(self.active) + list(self.waiting):
            self._drop(job, "cancelled")

    def _drop(self, job: Job, status: str) -> None:
        with self.cv:
            if job in self.active:
                self.active.remove(job)
            if job in self.waiting:
                self.waiting.remove(job)
        if job.gen is not None:
            with self.model_lock:
                job.gen.close()  # frees the generator's KV cache now, not at garbage collection
            job.gen = None
        self._finish(job, status)

    def _finish(self, job: Job, status: str) -> None:
        job._emit(END)
        if self.on_done is not None:
            self.on_done(job, status)

    def _step(self, job: Job) -> None:
        if job.cancelled.is_set():
            self._drop(job, "cancelled")
            return
        try:
            with self.model_lock:
                if job.gen is None:
                    job.t_start = time.perf_counter()
                    job.gen = iter(self.engine.stream(**job.kwargs))
                    if job.stop:
                        job.gen = apply_stops(job.gen, job.stop)
                rec = next(job.gen)
        except StopIteration:
            self._drop(job, "ok")
            return
        except Exception as e:  # a failed generation fails its own request, never the worker
            job._emit(e)
            self._drop(job, "error")
            return
        self._deliver(job, rec, time.perf_counter(), len(rec.token_ids))

    def _deliver(self, job: Job, rec, now: float, tokens: int) -> None:
        """A record to its job: counts, timings, the metrics hook; a final record ends the job (a
        stop string may end it before the engine would: dropping it frees its place)."""
        job.tokens += tokens
        if self.on_token is not None:
            self.on_token(job, now)
        if job.t_first is None:
            job.t_first = now
        job.t_last = now
        job._emit(rec)
        if rec.finish_reason is not None:
            self._drop(job, "ok")
