"""Server-sent event frames for streamed responses. Every content chunk of one request is the same
JSON but for its text, so the text around it is built once and a token costs one json.dumps of its
own delta, not of the whole chunk."""
from __future__ import annotations

import json
from typing import Any

from hetero.serve import schemas

_MARK = "\x00hetero-delta\x00"  # a text no request id or model name holds: where the delta goes


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Frames:
    """`delta(text)` is sse(schemas.chunk(req, text)), character for character."""

    def __init__(self, req: schemas.GenRequest):
        self.req = req
        whole = sse(schemas.chunk(req, _MARK))
        parts = whole.split(json.dumps(_MARK, ensure_ascii=False))
        self.around = (parts[0], parts[1]) if len(parts) == 2 else None

    def delta(self, text: str) -> str:
        if self.around is None:  # the mark showed up elsewhere too: frame the whole chunk
            return sse(schemas.chunk(self.req, text))
        return self.around[0] + json.dumps(text, ensure_ascii=False) + self.around[1]
