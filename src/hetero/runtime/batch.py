"""Many sequences at once: a batch runner over one model and a KV pool (continuous batching).

    runner = BatchRunner(model.net, kv_bytes=256 << 20, max_batch=16)
    a = runner.add(prompt_ids, max_new_tokens=64, params=SamplingParams(temperature=0.7, seed=1),
                   stop_ids=model.tokenizer.stop_ids)
    while not runner.idle:
        for ev in runner.step():        # Event(request, token, finish_reason)
            ...                         # stream ev.token to request ev.request; it left if finish_reason

The contract a server builds on:
- `add` queues a request (prompt ids, max new tokens, its own SamplingParams and stop ids) and
  returns its id; a request that can never fit the pool (or the context) is refused at once with
  HeteroError; otherwise it waits in FIFO order until there are blocks and a batch slot for it.
- `step` admits what fits, then runs ONE forward pass for every running sequence: one token each
  for those decoding, plus up to `prefill_tokens` prompt tokens of those still prefilling (chunked
  prefill: a long prompt is taken in pieces of `prefill_tokens`, so a step's time stays bounded;
  prompts shorter than the rest of a step's budget prefill in the same step). With `stall` set,
  a step that has sequences decoding takes fewer: as many as cost about `stall` decode steps,
  sized from the steps it has timed (runtime.chunking), so the streams running beside a long
  prompt's prefill keep their pace; a step with none decoding still takes `prefill_tokens`. It returns an Event
  for every token sampled in that step: one per decoding sequence, one for each prompt that
  finished prefilling. A sequence that finishes ("stop": a stop id was sampled, which is
  reported too; "length": max_new_tokens or the context reached) leaves the batch and its blocks
  return to the pool in the same step; new requests join at the next step.
- `cancel` drops a request, queued or running (a client that went away).
- Greedy output of a request is the same as runtime.generate.generate_step gives it alone, with
  fixed chunks (no `stall`): a prompt is then cut where it would be alone. With `stall` a prompt's
  cuts follow what shares its steps, and a chunk beside decoding streams runs as rows of the
  compiled stack (model/decoder.forward_ragged's chunks_as_rows), which round otherwise than the
  chunk's GEMMs alone, so a near-tie in the logits can go the other way (decode rows keep their bits).
Not thread-safe: one caller drives add/step/cancel (a server's engine thread).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from hetero.errors import HeteroError
from hetero.model.decoder import Decoder
from hetero.model.paged import Ragged, Segment
from hetero.runtime.chunking import ChunkPolicy
from hetero.runtime.generate import PREFILL_CHUNK
from hetero.runtime.kvcache import BLOCK, KVPool
from hetero.runtime.sampling import Sampler, SamplingParams

DEFAULT_KV_BYTES = 256 << 20
ROWS_CHUNK = 32   # most prompt tokens a timed chunk takes as stack rows beside decoding streams


@dataclass(frozen=True)
class Event:
    request: int
    token: int
    finish_reason: str | None = None  # "stop" | "length" | None while running


@dataclass
class _Seq:
    id: int
    prompt: list[int]
    total: int                          # positions it may reach: min(context, prompt + max new)
    max_new: int
    sampler: Sampler
    stop_ids: frozenset
    history: list[int] = field(default_factory=list)
    prefilled: int = 0                  # prompt tokens whose KV is written
    generated: int = 0
    blocks: tuple[int, ...] = ()
    keys: list = field(default_factory=list)  # the prompt's block keys (a pool with a prefix cache)
    published: int = 0                  # prompt blocks offered to the prefix cache so far


class BatchRunner:
    def __init__(self, model: Decoder, pool: KVPool | None = None, kv_bytes: int | None = None,
                 max_batch: int = 32, prefill_tokens: int = PREFILL_CHUNK, block: int = BLOCK,
                 stall: float | None = None):
        if max_batch < 1 or prefill_tokens < 1:
            raise HeteroError(f"max_batch and prefill_tokens must be ≥ 1, got {max_batch}, {prefill_tokens}")
        self.model = model
        self.pool = pool or KVPool(model, kv_bytes if kv_bytes is not None else DEFAULT_KV_BYTES, block=block)
        self.max_batch, self.prefill_tokens = max_batch, prefill_tokens
        # None: fixed chunks of prefill_tokens (a prompt cut where it would be alone)
        # least 1: the timed size, not a floor, bounds the streams' gap (4 rows at ~1,900 positions
        # cost about a whole decode step of 7 streams; docs/BENCHMARKS.md, chunked prefill)
        self.chunks = ChunkPolicy(prefill_tokens, least=1, stall=stall) if stall else None
        self.queue: deque[_Seq] = deque()
        self.running: list[_Seq] = []       # in admission order
        self._next = 0
        self.steps = 0
        self.tokens = 0                     # tokens sampled so far
        self.cached_tokens = 0              # prompt tokens taken from the pool's prefix cache
        self.last_decode_rows = self.last_prefill_tokens = 0   # what the latest step ran (metrics)

    @property
    def idle(self) -> bool:
        return not self.queue and not self.running

    def add(self, prompt_ids: list[int], max_new_tokens: int = 128, params: SamplingParams = SamplingParams(),
            stop_ids: set[int] | frozenset | None = None) -> int:
        ctx = self.model.spec.max_context
        n = len(prompt_ids)
        if n == 0:
            raise HeteroError("empty prompt")
        if n >= ctx:
            raise HeteroError(f"prompt is {n} tokens but the context is {ctx}")
        if max_new_tokens <= 0:
            raise HeteroError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
        total = min(ctx, n + max_new_tokens)
        if not self.pool.ever_fits(total):
            raise HeteroError(f"a request of {total} tokens needs {self.pool.blocks_for(total)} KV blocks; "
                              f"the pool has {self.pool.n_blocks}")
        seq = _Seq(self._next, list(prompt_ids), total, max_new_tokens, Sampler(params),
                   frozenset(stop_ids or ()), history=list(prompt_ids),
                   keys=self.pool.prefix_keys(prompt_ids) if self.pool.prefix_cache else [])
        self._next += 1
        self.queue.append(seq)
        return seq.id

    def cancel(self, rid: int) -> bool:
        for s in self.queue:
            if s.id == rid:
                self.queue.remove(s)
                return True
        for s in self.running:
            if s.id == rid:
                self._leave(s)
                return True
        return False

    def _admit(self) -> None:
        # FIFO: the head waits for blocks rather than being overtaken (no starvation of long prompts)
        while self.queue and len(self.running) < self.max_batch and self.pool.fits(self.queue[0].total):
            s = self.queue.popleft()
            s.blocks = self.pool.allocate(s.id, s.total, s.keys, len(s.prompt))
            s.prefilled = self.pool.cached.get(s.id, 0)   # its cached prefix is not run again
            s.published = s.prefilled // self.pool.block
            self.cached_tokens += s.prefilled
            self.running.append(s)

    def _leave(self, s: _Seq) -> None:
        self.running.remove(s)
        self.pool.free(s.id)

    def step(self) -> list[Event]:
        self._admit()
        if not self.running:
            return []
        # decode rows first, then prefill chunks; `want`: the segments that end in a sample, in order
        segs, ids, sampled, want = [], [], [], []
        for s in self.running:
            if s.prefilled == len(s.prompt):
                want.append(len(segs))
                segs.append(Segment(len(s.history) - 1, 1, s.blocks))
                ids.append(s.history[-1])
                sampled.append(s)
        n_decode = len(segs)
        most = self.prefill_tokens if self.chunks is None else self.chunks.tokens(n_decode)
        # timed chunks beside decoding streams ride in the compiled stack's step as more rows (its
        # row kernels win up to ~32 rows, a GEMM past them): one call, the weights read once
        as_rows = bool(self.chunks is not None and n_decode and self.model.chunks_as_rows(self.pool.kv))
        if as_rows:
            most = min(most, ROWS_CHUNK)
        budget = most
        for s in self.running:
            n = len(s.prompt)
            t = min(n - s.prefilled, most if self.chunks is None else budget)
            # fixed: whole chunks only (the first of a step always), a prompt cut where it would be
            # alone; adaptive: whatever is left of the step's budget
            if t > 0 and (t <= budget or budget == most):
                segs.append(Segment(s.prefilled, t, s.blocks))
                ids += s.prompt[s.prefilled:s.prefilled + t]
                s.prefilled += t
                budget -= t
                if s.prefilled == n:
                    want.append(len(segs) - 1)
                    sampled.append(s)
        if not segs:
            return []
        t0 = time.perf_counter()
        logits = self.model.forward_ragged(torch.tensor(ids, dtype=torch.long), Ragged(segs, self.pool.block),
                                           self.pool.kv, torch.tensor(want, dtype=torch.long), chunks_as_rows=as_rows)
        self.steps += 1
        self.last_decode_rows, self.last_prefill_tokens = n_decode, most - budget
        for s in self.running:   # prompt blocks now whole: later prompts with the same start share them
            while s.published < min(s.prefilled, len(s.keys) * self.pool.block) // self.pool.block:
                self.pool.publish(s.id, s.published, s.keys[s.published])
                s.published += 1
        events = []
        for s, lg in zip(sampled, logits):
            tok = s.sampler(lg, s.history)
            s.history.append(tok)
            s.generated += 1
            self.tokens += 1
            finish = "stop" if tok in s.stop_ids else ("length" if len(s.history) >= s.total else None)
            events.append(Event(s.id, tok, finish))
            if finish:
                self._leave(s)
        if self.chunks is not None:
            self.chunks.observe(n_decode, self.last_prefill_tokens, time.perf_counter() - t0)
        return events

    def run(self) -> dict[int, list[int]]:
        """Step until every request has finished; the generated ids of each."""
        out: dict[int, list[int]] = {}
        while not self.idle:
            for ev in self.step():
                out.setdefault(ev.request, []).append(ev.token)
        return out
