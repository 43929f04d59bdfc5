"""Stop sequences over a stream of generation records, holding back text that may be the start of one.

A stop sequence can span several tokens; text already sent cannot be taken back, so any tail of the
text that is a prefix of a stop sequence waits until the next token settles it.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterator


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop sequence."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class StopCutter:
    """The same cut, one record at a time (a caller that is handed records rather than pulling them):
    `feed(rec)` returns the record to send; once its finish_reason is set, the reply is over."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, rec):
        self.pending += rec.text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return replace(rec, text=out, finish_reason="stop")
        keep = 0 if rec.finish_reason else _held_back(self.pending, self.stops)
        out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return replace(rec, text=out)


def apply_stops(records: Iterator, stops: list[str]) -> Iterator:
    """Yield records with text cut at the first stop sequence (finish_reason "stop"), then end."""
    cut = StopCutter(stops)
    try:
        for rec in records:
            out = cut.feed(rec)
            yield out
            if out.finish_reason:
                return
    finally:
        close = getattr(records, "close", None)
        if close is not None:
            close()  # stop the engine's generation now, freeing its KV cache
