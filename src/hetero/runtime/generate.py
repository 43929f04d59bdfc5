"""Generation in three layers: `generate_step` yields token ids; `stream_generate` turns them into
response records (text delta, counts, speeds, finish reason); callers join them for a plain string.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from hetero.errors import HeteroError
from hetero.model.decoder import Decoder
from hetero.model.tokenizer import Tokenizer
from hetero.runtime.sampling import Sampler, SamplingParams
from hetero.runtime.stops import apply_stops

PREFILL_CHUNK = 512  # long prompts are processed in chunks to bound activation memory


@dataclass
class Record:
    """One step of a streamed response."""
    text: str                       # new text since the previous record
    token_ids: list[int]            # new token ids since the previous record
    prompt_tokens: int
    generated_tokens: int
    prefill_tok_s: float
    decode_tok_s: float
    finish_reason: str | None = None  # "stop" | "length" | None while running
    timings: dict = field(default_factory=dict)


def generate_step(model: Decoder, prompt_ids: list[int], max_new_tokens: int, sampler: Sampler,
                  stop_ids: set[int], max_len: int | None = None) -> Iterator[tuple[int, float]]:
    """Yield (token id, seconds since start) for each generated token; the first includes prefill."""
    ctx = max_len or model.spec.max_context
    n = len(prompt_ids)
    if n == 0:
        raise HeteroError("empty prompt")
    if n >= ctx:
        raise HeteroError(f"prompt is {n} tokens but the context is {ctx}")
    total = min(ctx, n + max_new_tokens)
    cache = model.new_cache(1, total)
    t0 = time.perf_counter()
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    logits = None
    for s in range(0, n, PREFILL_CHUNK):
        logits = model(ids[:, s:s + PREFILL_CHUNK], s, cache)
    history = list(prompt_ids)
    pos = n
    while True:
        tok = sampler(logits[0], history)
        history.append(tok)
        yield tok, time.perf_counter() - t0
        pos += 1
        if tok in stop_ids or pos >= total:
            return
        logits = model(torch.tensor([[tok]], dtype=torch.long), pos - 1, cache)


class Detok:
    """Incremental detokenisation: emit only text that is stable (no half UTF-8 sequence).

    O(1) a token: only the tokens since the last emission (plus those of the one before, for the
    context a tokenizer needs to place spaces) are decoded, never the whole reply: the new text is
    what the window decodes to past what its already emitted part does. A window starts where an
    emission ended, on a character boundary, so the deltas join to the whole reply's decode.
    """

    def __init__(self, tok: Tokenizer):
        self.tok, self.ids = tok, []
        self.start = 0  # window start: the first token of the emission before the last one
        self.read = 0   # tokens up to here are emitted

    def add(self, tid: int) -> str:
        self.ids.append(tid)
        done = self.tok.decode(self.ids[self.start:self.read]) if self.read > self.start else ""
        text = self.tok.decode(self.ids[self.start:])
        if text.endswith("\ufffd") or len(text) <= len(done):  # half a character, or nothing new
            return ""
        self.start, self.read = self.read, len(self.ids)
        return text[len(done):]


_Detok = Detok  # the older name, still imported by tests and benchmarks


def stream_generate(model: Decoder, tok: Tokenizer, prompt_ids: list[int], max_new_tokens: int = 128,
                    params: SamplingParams = SamplingParams(), stop: list[str] | None = None,
                    stop_ids: set[int] | None = None) -> Iterator[Record]:
    """Records as tokens come; text is cut at the first of the `stop` strings, and text that may be
    the start of one is held back until the next token settles it (runtime.stops)."""
    if max_new_tokens <= 0:
        raise HeteroError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    records = _records(model, tok, prompt_ids, max_new_tokens, params, stop_ids)
    stop = [s for s in (stop or []) if s]
    return apply_stops(records, stop) if stop else records


def _records(model: Decoder, tok: Tokenizer, prompt_ids: list[int], max_new_tokens: int,
             params: SamplingParams, stop_ids: set[int] | None) -> Iterator[Record]:
    sampler = Sampler(params)
    stops = tok.stop_ids if stop_ids is None else stop_ids
    detok = Detok(tok)
    n_prompt = len(prompt_ids)
    t_first = None
    count = 0
    for tid, elapsed in generate_step(model, prompt_ids, max_new_tokens, sampler, stops):
        count += 1
        if t_first is None:
            t_first = elapsed
        prefill = n_prompt / t_first if t_first > 0 else 0.0
        decode = (count - 1) / (elapsed - t_first) if count > 1 and elapsed > t_first else 0.0
        if tid in stops:
            yield Record("", [tid], n_prompt, count, prefill, decode, "stop")
            return
        delta = detok.add(tid)
        finish = None
        if count >= max_new_tokens or n_prompt + count >= model.spec.max_context:
            finish = "length"
        yield Record(delta, [tid], n_prompt, count, prefill, decode, finish)
        if finish:
            return
