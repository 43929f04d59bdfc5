"""The interleaved scheduler (architectures without ragged steps): interleaving, 429 when full, and
cancellation on disconnect. The batched one is tests/serve/test_batching.py."""
from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from hetero.serve.app import create_app

from .helpers import Server, SlowEngine, wait_until

MODEL = "synthetic:tiny"
DELAY = 0.05   # seconds per token: a 400-token reply would run 20 s unless cancelled


def cancelled(srv: Server) -> float:
    return srv.app.state.metrics.counter_value("hetero_generations_total", outcome="cancelled")


@pytest.fixture
def slow(tiny_engine):
    return SlowEngine(tiny_engine, DELAY)


def test_disconnect_mid_stream_frees_the_place_within_1s(slow):
    with Server(create_app(slow, batching=False, max_concurrency=1, max_queue=4)) as srv:
        c = srv.client()
        stream = c.completions.create(model=MODEL, prompt="long", max_tokens=400, temperature=0, stream=True)
        it = iter(stream)
        for _ in range(3):
            next(it)
        assert srv.scheduler.counts() == (1, 0)
        t0 = time.monotonic()
        stream.close()  # the client goes away mid-stream
        wait_until(lambda: srv.scheduler.counts() == (0, 0) and cancelled(srv) == 1, timeout=1.0)
        assert time.monotonic() - t0 < 1.0
        made = slow.tokens_made
        time.sleep(0.3)
        assert slow.tokens_made == made < 100  # the generation really stopped
        # The freed place serves the next request at once.
        t1 = time.monotonic()
        r = c.completions.create(model=MODEL, prompt="next", max_tokens=3)
        assert r.usage.completion_tokens == 3 and time.monotonic() - t1 < 2.0


def test_disconnect_while_queued_leaves_the_queue(slow):
    with Server(create_app(slow, batching=False, max_concurrency=1, max_queue=4)) as srv:
        c = srv.client()
        running = c.completions.create(model=MODEL, prompt="first", max_tokens=400, stream=True)
        next(iter(running))
        done = {}

        def queued():
            try:
                with httpx.stream("POST", srv.url + "/v1/completions", timeout=0.6,
                                  json={"model": MODEL, "prompt": "second", "max_tokens": 5, "stream": True}) as r:
                    done["status"] = r.status_code
            except httpx.TimeoutException:
                done["timeout"] = True  # no first token within 0.6 s: the client gives up and disconnects

        t = threading.Thread(target=queued)
        t.start()
        wait_until(lambda: srv.scheduler.counts() == (1, 1), timeout=2.0)
        t.join(5)
        assert done == {"timeout": True}
        wait_until(lambda: srv.scheduler.counts() == (1, 0), timeout=1.0)
        running.close()
        # both generations cancelled within 1 s (the counter is bumped just after the slot is freed)
        wait_until(lambda: srv.scheduler.counts() == (0, 0) and cancelled(srv) == 2, timeout=1.0)


def test_disconnect_of_unstreamed_request_cancels_it(slow):
    with Server(create_app(slow, batching=False, max_concurrency=1, max_queue=4)) as srv:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(srv.url + "/v1/completions", timeout=0.5,
                       json={"model": MODEL, "prompt": "x", "max_tokens": 400})
        t0 = time.monotonic()
        wait_until(lambda: srv.scheduler.counts() == (0, 0) and cancelled(srv) == 1, timeout=1.0)
        assert time.monotonic() - t0 < 1.0


def test_full_server_answers_429_and_keeps_serving(slow):
    with Server(create_app(slow, batching=False, max_concurrency=1, max_queue=0)) as srv:
        c = srv.client()
        running = c.completions.create(model=MODEL, prompt="first", max_tokens=400, stream=True)
        next(iter(running))
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model=MODEL, prompt="second", max_tokens=2)
        assert e.value.status_code == 429 and e.value.response.headers["retry-after"] == "1"
        # /health jumps the queue and is never refused.
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
        running.close()
        wait_until(lambda: srv.scheduler.counts() == (0, 0), timeout=1.0)
        assert c.completions.create(model=MODEL, prompt="third", max_tokens=2).usage.completion_tokens == 2


def test_requests_are_interleaved_token_by_token(slow):
    # Two 12-token streams with two places: the second's first token comes before the first ends.
    with Server(create_app(slow, batching=False, max_concurrency=2, max_queue=0)) as srv:
        c = srv.client()
        events: list[tuple[str, float]] = []

        def run(name):
            for ch in c.completions.create(model=MODEL, prompt=name, max_tokens=12, stream=True):
                if ch.choices and ch.choices[0].finish_reason:
                    events.append((name + " end", time.monotonic()))
                elif ch.choices:
                    events.append((name, time.monotonic()))

        threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        names = [n for n, _ in sorted(events, key=lambda e: e[1])]
        assert names.index("b") < names.index("a end") and names.index("a") < names.index("b end")
