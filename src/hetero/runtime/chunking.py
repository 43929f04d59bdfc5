"""How many prompt tokens a batched step prefills while other sequences decode (chunked prefill).

The running streams' inter-token gap is one step. A step that also carries a chunk of a long
prompt is longer by the chunk's time, so every stream's gap grows by it. Here the chunk is sized
from the steps just run: its tokens should cost about `stall` decode-only steps (1.0: a gap during
a prefill is ~2x the usual one), never fewer than `least` tokens, never more than `most`. With
nothing decoding a step takes `most`: nobody waits on it.

    policy.observe(n_decode, n_prefill, seconds)   # after every step
    policy.tokens(n_decode)                         # the prefill budget of the next step

The sizing update is p' = stall * t_decode / (extra time / p): with extra(p) = a + b*p (a chunk's
fixed cost plus its tokens') it settles where extra(p) = stall * t_decode, whatever a and b are.
"""
from __future__ import annotations


class ChunkPolicy:
    def __init__(self, most: int, least: int = 16, stall: float = 1.0, smooth: float = 0.3):
        if most < 1 or least < 1 or stall <= 0 or not 0 < smooth <= 1:
            raise ValueError(f"bad chunk policy: most={most} least={least} stall={stall} smooth={smooth}")
        self.most, self.least, self.stall, self.smooth = most, min(least, most), stall, smooth
        self.t_decode: float | None = None     # seconds of a decode-only step (the latest batch size)
        self.t_token: float | None = None      # extra seconds a prefill token adds to a step

    def _avg(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.smooth * (new - old)

    def observe(self, n_decode: int, n_prefill: int, seconds: float) -> None:
        if n_prefill == 0:
            if n_decode:
                self.t_decode = self._avg(self.t_decode, seconds)
            return
        # what the chunk added: the whole step when nothing decoded beside it
        base = (self.t_decode or 0.0) if n_decode else 0.0
        self.t_token = self._avg(self.t_token, max(seconds - base, 0.0) / n_prefill)

    def tokens(self, n_decode: int) -> int:
        if n_decode == 0:
            return self.most
        if self.t_decode is None or not self.t_token:
            return self.least  # not measured yet: the small chunk is the safe one
        return max(self.least, min(self.most, int(self.stall * self.t_decode / self.t_token)))
