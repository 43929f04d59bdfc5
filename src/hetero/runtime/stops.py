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


def apply_stops(records: Iterator, stops: list[str]) -> Iterator:
    """Yield records with text cut at the first stop sequence (finish_reason "stop"), then end."""
    pending = ""
    try:
        for rec in records:
            pending += rec.text
            hits = [i for i in (pending.find(s) for s in stops) if i >= 0]
            if hits:
                yield replace(rec, text=pending[:min(hits)], finish_reason="stop")
                return
            keep = 0 if rec.finish_reason else _held_back(pending, stops)
            out, pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
            yield replace(rec, text=out)
            if rec.finish_reason:
                return
    finally:
        close = getattr(records, "close", None)
        if close is not None:
            close()  # stop the engine's generation now, freeing its KV cache
