"""Stop strings over a record stream: cut at the first one, never emit text that a later token retracts."""
from __future__ import annotations

from dataclasses import dataclass

from hetero.runtime.stops import apply_stops


@dataclass(frozen=True)
class Rec:
    text: str
    finish_reason: str | None = None


def run(pieces: list[str], stops: list[str], last: str | None = "length") -> list[Rec]:
    recs = [Rec(p) for p in pieces[:-1]] + [Rec(pieces[-1], last)]
    return list(apply_stops(iter(recs), stops))


def test_stop_spanning_tokens_is_never_half_emitted():
    out = run(["Hel", "lo Wo", "rld", "!"], ["o World"])
    assert [r.text for r in out] == ["Hel", "l", ""]   # "o Wo" waited, then was cut with "rld"
    assert out[-1].finish_reason == "stop"


def test_held_text_is_released_when_the_stop_does_not_come():
    out = run(["a W", "ay"], ["Wx"])
    assert [r.text for r in out] == ["a ", "Way"] and out[-1].finish_reason == "length"


def test_earliest_of_several_stops_wins_and_end_flushes():
    assert "".join(r.text for r in run(["x END y STOP"], ["STOP", "END"])) == "x "
    out = run(["ab", "c"], ["cd"])  # the tail "c" may start "cd", but the stream ended: flushed
    assert "".join(r.text for r in out) == "abc" and out[-1].finish_reason == "length"


def test_closes_the_source_generator():
    closed = []

    def gen():
        try:
            yield Rec("one STOP two")
            yield Rec("never")
        finally:
            closed.append(True)
    assert [r.text for r in apply_stops(gen(), ["STOP"])] == ["one "]
    assert closed == [True]
