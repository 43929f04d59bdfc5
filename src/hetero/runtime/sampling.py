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
        if p.top_k > 0 and p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            drop = cum - torch.softmax(sorted_logits, dim=-1) >= p.top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator_for(probs.device)))
