"""Choosing the next token: greedy, temperature, top-k, top-p, repetition penalty, seeded."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hetero.errors import HeteroError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1 = off
    repetition_penalty: float = 1.0   # 1 = off (CTRL-style: divide positive logits, multiply negative)
    seed: int | None = None

    def validate(self) -> "SamplingParams":
        if not (0.0 <= self.temperature <= 100.0):
            raise HeteroError(f"temperature must be in [0, 100], got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise HeteroError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise HeteroError(f"top_k must be ≥ 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise HeteroError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        return self


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params.validate()
        self.gen = self._generator("cpu")

    def _generator(self, device) -> torch.Generator:
        # torch.multinomial wants a generator on the probabilities' device; the seed is the same
        g = torch.Generator(device=device)
        if self.p.seed is not None:
            g.manual_seed(self.p.seed)
        else:
            g.seed()
        return g

    def generator_for(self, device: torch.device) -> torch.Generator:
        """This sampler's generator on `device` (made once, on the first draw there)."""
        if self.gen.device != device:
            self.gen = self._generator(device)
        return self.gen

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        """logits: [V] fp32 for the last position; history: ids so far (prompt + generated)."""
        p = self.p
        if p.repetition_penalty != 1.0 and history:
            idx = torch.tensor(sorted(set(history)), dtype=torch.long)
            vals = logits[idx]
            logits = logits.clone()
            logits[idx] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.temperature == 0.0:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        ids = None  # candidate token ids, most likely first (None: every token, in id order)
        if p.top_k > 0 and p.top_k < logits.numel():
            logits, ids = torch.topk(logits, p.top_k)
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            probs, ids = _nucleus(probs, ids, p.top_p)
        return self._draw(probs, ids)

    def _draw(self, probs: torch.Tensor, ids: torch.Tensor | None) -> int:
        """One draw from `probs` (unnormalised is fine) by inverting its CDF with one uniform number:
        the same distribution torch.multinomial draws from, at a fraction of its cost on a 50k vocab."""
        cdf = probs.cumsum(0)
        u = torch.rand(1, generator=self.generator_for(probs.device), device=probs.device) * cdf[-1]
        # right=True: the first index whose cdf exceeds u, so a token of probability 0 is never drawn
        i = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.numel() - 1)
        i = int(i) if probs[i] > 0 else int(torch.nonzero(probs).max())  # u rounded up onto the end
        return i if ids is None else int(ids[i])


def _nucleus(probs: torch.Tensor, ids: torch.Tensor | None, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest most-likely set whose mass reaches top_p (always at least one token: a token is
    kept while the mass of those more likely is < top_p), as (probs, ids); `ids` None means `probs`
    is the whole vocabulary in id order. The order is most likely first when the top 64 hold the
    mass, else any: a draw inverts the set's CDF, whose distribution does not depend on the order."""
    if ids is None:
        n = probs.numel()
        if n > 64:   # peaked: the top 64 hold the mass and are the nucleus's start
            top, top_ids = torch.topk(probs, 64)
            if float(top.cumsum(0)[-1]) >= top_p:
                return _prefix(top, top_ids, top_p)
            return _select(probs, top_p)
        probs, ids = torch.sort(probs, descending=True)
    return _prefix(probs, ids, top_p)


def _prefix(probs: torch.Tensor, ids: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The nucleus of `probs` sorted most likely first: the prefix whose mass before each is < top_p."""
    keep = max(1, int((probs.cumsum(0) - probs < top_p).sum()))
    return probs[:keep], ids[:keep]


def _select(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The nucleus of a flat distribution without sorting it (a 50k sort costs milliseconds a token,
    the most of a batched step's sampling). The tokens are bucketed by the top bits of their fp32
    probability (an integer order that is the value's, 16 buckets an octave) and the buckets' mass
    summed, in one pass. Every token of a bucket above the one where the mass from the top reaches
    top_p is kept (less than top_p is before it), every one below is dropped, and that bucket's few
    are sorted and cut as the full sort would."""
    p = np.ascontiguousarray(probs.detach().to("cpu", torch.float32).numpy())
    bucket = p.view(np.int32) >> 19             # sign, exponent and 4 mantissa bits: monotone for p >= 0
    mass = np.bincount(bucket, weights=p)       # fp64 sums
    at_or_above = np.cumsum(mass[::-1])[::-1]   # mass of the buckets >= k
    reach = np.flatnonzero(at_or_above >= top_p)
    if reach.size == 0:                         # rounding left the total under top_p: every token
        ids = np.flatnonzero(p > 0)
    else:
        k = int(reach[-1])
        before = float(at_or_above[k] - mass[k])   # the mass of every bucket above k
        cand = np.flatnonzero(bucket == k)
        vals = p[cand].astype(np.float64)
        order = np.argsort(-vals, kind="stable")
        vals = vals[order]
        last = max(1, int(np.count_nonzero(before + np.cumsum(vals) - vals < top_p)))
        ids = np.concatenate([np.flatnonzero(bucket > k), cand[order[:last]]])
    ids = torch.from_numpy(ids).to(device=probs.device)
    return probs[ids], ids
