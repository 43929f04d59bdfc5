"""Choosing the next token: greedy, temperature, top-k, top-p, repetition penalty, seeded."""
from __future__ import annotations

from dataclasses import dataclass

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
    """The smallest most-likely prefix whose mass reaches top_p (always at least one token), as
    (probs, ids) most likely first; `ids` None means `probs` is the whole vocabulary in id order."""
    if ids is None:
        probs, ids = _most_likely(probs, top_p)
    cum = probs.cumsum(0)
    keep = max(1, int((cum - probs < top_p).sum()))  # a token is kept while the mass before it is < top_p
    return probs[:keep], ids[:keep]


def _most_likely(probs: torch.Tensor, mass: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The most likely tokens, sorted, at least until their mass reaches `mass`. Sorting a 50k vocabulary
    costs milliseconds a token, so the top 64 (then 1024) are tried first: once they hold the mass, the
    nucleus lies within them (every later token has at least that mass before it), as a full sort gives."""
    n = probs.numel()
    for k in (64, 1024):
        if k < n:
            top, ids = torch.topk(probs, k)
            if float(top.cumsum(0)[-1]) >= mass:
                return top, ids
    return torch.sort(probs, descending=True)
