"""One batched request's tokens as the Records `Engine.stream` yields for a request run alone.

The batch runner hands out bare token ids (runtime.batch.Event); a Reply turns each into a Record:
the text delta (incremental detokenisation, runtime.generate.Detok), prefill and decode rates, the
finish reason, and the text cut at the request's stop strings (runtime.stops.StopCutter). The
record stream is the one runtime.generate._records would give for the same tokens.
"""
from __future__ import annotations

from hetero.runtime.generate import Detok, Record
from hetero.runtime.stops import StopCutter


class Reply:
    def __init__(self, tokenizer, prompt_tokens: int, stop: list[str] | None, t_start: float):
        self.detok = Detok(tokenizer)
        self.cut = StopCutter(stop) if stop and any(stop) else None
        self.prompt_tokens, self.t_start = prompt_tokens, t_start
        self.count = 0
        self.t_first: float | None = None

    def push(self, token: int, finish: str | None, now: float) -> Record:
        """The record of one sampled token; finish: the runner's ("stop": a stop id, "length") or None.
        The record's finish_reason is set when the reply is over (a stop string may end it early)."""
        self.count += 1
        if self.t_first is None:
            self.t_first = now
        first = self.t_first - self.t_start
        prefill = self.prompt_tokens / first if first > 0 else 0.0
        decode = (self.count - 1) / (now - self.t_first) if self.count > 1 and now > self.t_first else 0.0
        # a stop id ends the reply without text of its own, as generation alone does
        text = "" if finish == "stop" else self.detok.add(token)
        rec = Record(text, [token], self.prompt_tokens, self.count, prefill, decode, finish)
        return self.cut.feed(rec) if self.cut is not None else rec
