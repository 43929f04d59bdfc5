"""Continuous batching: one worker thread drives a runtime BatchRunner over the engine's model.

Requests join the running batch at a step boundary when a batch place and KV blocks for their
whole length (prompt + max_tokens) are free, in FIFO order (the /health probe first, with one place
of its own); they leave it in the step they finish, are cancelled (the client went away) or hit a
stop string, and their blocks go back to the pool at once. A request that does not fit waits in
the queue (429 past --max-queue, as Scheduler.submit says), so no stream ever fails to allocate.
A long prompt is prefilled in chunks between decode steps (chunked prefill): up to
`prefill_tokens` a step when nothing else runs, and beside decoding streams as many as cost about
`stall` of their decode steps (runtime.chunking, timed as it runs), so the streams already running
keep their pace (their gap stays under ~(1 + stall)x) while a long prompt is taken in. Every token goes out as a Record
(serve.replies) through the job's mailbox, as with the interleaved Scheduler.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from hetero.model.arch import architecture
from hetero.model.paged import PagedKV
from hetero.runtime.batch import BatchRunner
from hetero.runtime.kvcache import KVPool
from hetero.runtime.sampling import SamplingParams
from hetero.serve.kvsize import pool_bytes
from hetero.serve.replies import Reply
from hetero.serve.scheduler import Job, Scheduler

PREFILL_CHUNK = 512  # prompt tokens a step takes with nothing decoding: as runtime.generate cuts a prompt
PREFILL_STALL = 0.6  # beside decoding streams a chunk costs about 0.6 of their steps (a gap ~1.6x the usual)


def can_batch(engine: Any) -> bool:
    """Whether the engine's model takes ragged batched steps (Gemma 3 and MoE models do not yet)."""
    net = engine.model.net
    return bool(architecture(engine.model.spec).ragged and getattr(net, "has_embed", False)
                and getattr(net, "has_head", False))


def token_bytes(net) -> int:
    """K and V of one token over every layer, at the dtypes the pool holds them in."""
    return PagedKV.block_bytes(net.spec, 1, [layer.dtype for layer in net.layers])


class BatchScheduler(Scheduler):
    """Scheduler's interface (submit, counts, tokenize, start/stop) over one BatchRunner."""

    def __init__(self, engine: Any, max_concurrency: int = 8, max_queue: int = 64,
                 on_token: Callable[[Job, float], None] | None = None,
                 on_done: Callable[[Job, str], None] | None = None,
                 on_step: Callable[[BatchRunner, float], None] | None = None,
                 kv_bytes: int | None = None, context: int | None = None,
                 prefill_tokens: int = PREFILL_CHUNK, stall: float | None = PREFILL_STALL,
                 prefix_cache: bool = False):
        super().__init__(engine, max_concurrency, max_queue, on_token, on_done)
        net = engine.model.net
        context = min(context or net.spec.max_context, net.spec.max_context)
        if kv_bytes is None:
            kv_bytes = pool_bytes(engine.plan, token_bytes(net), context, max_concurrency)
        # one place beyond max_concurrency: /health never waits for a stream to end
        self.runner = BatchRunner(net, pool=KVPool(net, kv_bytes, prefix_cache=prefix_cache), max_batch=max_concurrency + 1,
                                  prefill_tokens=prefill_tokens, stall=stall or None)
        self.on_step = on_step
        self.jobs: dict[int, Job] = {}  # runner request id -> job

    # ---- worker side -----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.cv:
                for j in [j for j in self.waiting if j.cancelled.is_set()]:
                    self.waiting.remove(j)
                    self._finish(j, "cancelled")
                if self.stopping:
                    break
                if not self.waiting and not self.active:
                    self.cv.wait()
                    continue
                joining = self._joining()
            for job in [j for j in self.active if j.cancelled.is_set()]:
                self._drop(job, "cancelled")  # its blocks are free for the next step
            for job in joining:
                self._join(job)
            if self.jobs:
                self._step()
        for job in list(self.active) + list(self.waiting):
            self._drop(job, "cancelled")

    def _joining(self) -> list[Job]:
        """Jobs that join at this step (under cv): FIFO while places and blocks last."""
        pool, runner = self.runner.pool, self.runner
        free, places = pool.free_blocks, runner.max_batch - len(runner.running)
        normal = sum(not j.priority for j in self.active)
        out = []
        while self.waiting and places > 0:
            job = self.waiting[0]
            if not job.priority and normal >= self.max_concurrency:
                break
            if job.prompt_ids is None:  # /health's prompt, or any job queued without ids
                try:
                    with self.model_lock:
                        job.prompt_ids = self.engine.model.prompt_ids(job.kwargs["prompt"],
                                                                      job.kwargs.get("chat"))
                except Exception as e:
                    self.waiting.popleft()
                    job._emit(e)
                    self._finish(job, "error")
                    continue
            need = pool.blocks_for(self._length(job))
            # the head waits for blocks rather than being overtaken; one that can never fit joins
            # only to be refused by the runner in one clear error
            if need > free and need <= pool.n_blocks:
                break
            self.waiting.popleft()
            self.active.append(job)
            out.append(job)
            free, places, normal = free - need, places - 1, normal + (not job.priority)
        return out

    def _length(self, job: Job) -> int:
        n = len(job.prompt_ids)
        return min(self.runner.model.spec.max_context, n + int(job.kwargs.get("max_new_tokens") or 1))

    def _join(self, job: Job) -> None:
        kw = job.kwargs
        params = SamplingParams(kw.get("temperature", 0.0), kw.get("top_k", 0), kw.get("top_p", 1.0),
                                kw.get("repetition_penalty", 1.0), kw.get("seed"))
        tok = self.engine.model.tokenizer
        try:
            job.rid = self.runner.add(job.prompt_ids, int(kw.get("max_new_tokens") or 1), params, tok.stop_ids)
        except Exception as e:  # a request the pool or context can never hold fails alone
            job._emit(e)
            self._drop(job, "error")
            return
        job.t_start = time.perf_counter()
        job.reply = Reply(tok, len(job.prompt_ids), job.stop, job.t_start)
        self.jobs[job.rid] = job

    def _step(self) -> None:
        try:
            with self.model_lock:
                t0 = time.perf_counter()
                events = self.runner.step()
                now = time.perf_counter()
                out = [(self.jobs[ev.request], ev.request) for ev in events]
                recs = [job.reply.push(ev.token, ev.finish_reason, now) for (job, _), ev in zip(out, events)]
        except Exception as e:  # a failed step fails the requests in it, never the worker
            for job in list(self.active):
                if job.rid is not None:
                    job._emit(e)
                    self._drop(job, "error")
            return
        if self.on_step is not None:
            self.on_step(self.runner, now - t0)
        for (job, _), rec in zip(out, recs):
            self._deliver(job, rec, now, 1)
        if recs:
            last = recs[-1]
            self.engine.last = {"prefill_tok_s": last.prefill_tok_s, "decode_tok_s": last.decode_tok_s,
                                "prompt_tokens": last.prompt_tokens, "generated_tokens": last.generated_tokens}

    def _drop(self, job: Job, status: str) -> None:
        with self.cv:
            if job in self.active:
                self.active.remove(job)
            if job in self.waiting:
                self.waiting.remove(job)
        if job.rid is not None:
            self.jobs.pop(job.rid, None)
            self.runner.cancel(job.rid)  # False when it already left the batch by itself
            job.rid = None
        self._finish(job, status)
