"""The streamed path's parts: pre-built SSE frames are the whole chunk's JSON character for character,
and the worker-to-loop mailbox wakes the loop once per wait, not once per record."""
from __future__ import annotations

import asyncio
import json
import threading

from hetero.serve import schemas
from hetero.serve.mailbox import Mailbox
from hetero.serve.sse import Frames, sse

TEXTS = ["", "plain", ' "quoted" and \\ back\\slash', "new\nline\ttab\r", "é 日本語 🙂", "\x00\x1f ctrl", "\ufffd"]


def request(kind: str, model: str = "m") -> schemas.GenRequest:
    body = {"model": model, "stream": True, "max_tokens": 4}
    body.update({"prompt": "hi"} if kind == "completion" else {"messages": [{"role": "user", "content": "hi"}]})
    return schemas.parse_request(body, kind, {model})


def test_frames_are_the_whole_chunk_json():
    for kind in ("chat", "completion"):
        for model in ("m", 'a "quoted" \u00e9 model'):
            req = request(kind, model)
            frames = Frames(req)
            assert frames.around is not None  # the fast path is the one taken
            for text in TEXTS:
                frame = frames.delta(text)
                assert frame == sse(schemas.chunk(req, text))
                assert frame.startswith("data: ") and frame.endswith("\n\n")
                got = json.loads(frame[6:])
                assert (got["choices"][0]["delta"]["content"] if kind == "chat" else got["choices"][0]["text"]) == text


def test_mailbox_wakes_only_a_parked_reader():
    async def main():
        loop = asyncio.get_running_loop()
        box = Mailbox(loop)
        wakes = []
        real = loop.call_soon_threadsafe

        def counting(cb, *args):
            wakes.append(cb)
            return real(cb, *args)

        loop.call_soon_threadsafe = counting
        # records put while nobody waits: no wake-up at all, and all come back in one take
        for i in range(5):
            box.put(i)
        assert wakes == [] and box.wait() is None and box.take(2) == [0, 1] and box.take() == [2, 3, 4]
        # a parked reader is woken once by the first record from another thread; later ones just queue
        waiter = box.wait()
        t = threading.Thread(target=lambda: [box.put(i) for i in range(10, 13)])
        t.start()
        await asyncio.wait_for(waiter, 5)
        t.join()
        assert len(wakes) == 1 and box.take() == [10, 11, 12] and box.take() == []

    asyncio.run(main())
