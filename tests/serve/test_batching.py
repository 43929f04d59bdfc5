"""Continuous batching in the server (serve/batched.py): streams that share steps each get what they
get alone, requests join running batches, a small KV pool queues, a disconnect frees blocks, and
/metrics shows the batch."""
from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from hetero.serve.app import create_app
from hetero.serve.batched import BatchScheduler, token_bytes

from .helpers import Server, slow_steps, wait_until

MODEL = "synthetic:tiny"
STEP_S = 0.004  # a slowed step: concurrent clients really share steps
# (prompt, max_tokens): mixed lengths, one longer than the prefill chunk
CASES = [("Once upon a time", 24), ("The quick brown fox jumps over the lazy dog " * 4, 16), ("a", 30),
         ("Tell me a story about a dragon", 20)]


@pytest.fixture(scope="module")
def alone(tiny_engine):
    """Each case's text and finish reason run alone through Engine.stream (no server running)."""
    model = tiny_engine.model

    def run(prompt, n, stop=None, **kw):
        recs = list(model.stream(prompt, max_new_tokens=n, chat=False, stop=stop, **{"temperature": 0.0, **kw}))
        return "".join(r.text for r in recs), recs[-1].finish_reason

    return run


def _stream(c, prompt, n, stop=None, **kw):
    text, finish = [], None
    for ch in c.completions.create(model=MODEL, prompt=prompt, max_tokens=n, stream=True, stop=stop,
                                   **{"temperature": 0, **kw}):
        if ch.choices:
            text.append(ch.choices[0].text or "")
            finish = ch.choices[0].finish_reason or finish
    return "".join(text), finish


def _metric(srv, name) -> float:
    for line in httpx.get(srv.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not on /metrics")


def _concurrently(fns):
    out, threads = {}, []
    for i, fn in enumerate(fns):
        t = threading.Thread(target=lambda i=i, fn=fn: out.__setitem__(i, fn()))
        threads.append(t)
        t.start()
    for t in threads:
        t.join(60)
    return [out.get(i) for i in range(len(fns))]


def test_concurrent_streams_each_get_their_text_alone_and_metrics_show_the_batch(tiny_engine, alone):
    # fixed chunks (prefill_stall=0): a prompt is cut where it would be alone, so its bits are the
    # same; with the adaptive policy its cuts follow what shares the step (a different rounding)
    app = create_app(tiny_engine, max_concurrency=8, max_queue=8, prefill_chunk=8, prefill_stall=0)
    assert isinstance(app.state.scheduler, BatchScheduler)
    slow_steps(app.state.scheduler, STEP_S)
    with Server(app) as srv:
        c = srv.client()
        # alone: one request at a time (each prompt prefilled in the same chunks as in the batch)
        want = [_stream(c, p, n) for p, n in CASES]
        assert want[2] == alone(*CASES[2])  # a one-step prefill: what Engine.stream gives
        # a stop string from inside one reply: cut per request while the others run on
        text0 = want[0][0]
        stop = text0[len(text0) // 2:len(text0) // 2 + 2]
        want_stop = _stream(c, CASES[0][0], CASES[0][1], stop=[stop])
        assert want_stop[1] == "stop" and len(want_stop[0]) < len(text0)
        steps0, rows0 = _metric(srv, "hetero_batch_steps_total"), _metric(srv, "hetero_batch_decode_rows_total")
        # one request samples (its own temperature and seed) in the same steps as the greedy ones
        sampled = CASES[3][0], CASES[3][1], {"temperature": 1.5, "seed": 7}
        got = _concurrently([lambda p=p, n=n: _stream(c, p, n) for p, n in CASES]
                            + [lambda: _stream(c, CASES[0][0], CASES[0][1], stop=[stop]),
                               lambda: _stream(c, sampled[0], sampled[1], **sampled[2])])
        assert got[:len(CASES)] == want
        assert got[len(CASES)] == want_stop
        assert got[-1][0] != want[3][0]  # sampled, not greedy: parameters are per request
        steps = _metric(srv, "hetero_batch_steps_total") - steps0
        rows = _metric(srv, "hetero_batch_decode_rows_total") - rows0
        assert steps > 0 and rows / steps > 1.5  # the streams shared steps
        assert _metric(srv, "hetero_batch_prefill_tokens_total") >= 2 * sum(
            len(tiny_engine.model.prompt_ids(p, chat=False)) for p, _ in CASES)
        runner = srv.scheduler.runner
        assert _metric(srv, "hetero_kv_blocks_total") == runner.pool.n_blocks > 0
        assert _metric(srv, "hetero_kv_blocks_used") == 0  # every finished request gave its blocks back
        assert 0 < _metric(srv, "hetero_kv_resident_bytes") <= runner.pool.nbytes()
        for name in ("hetero_batch_size", "hetero_batch_prefill_tokens", "hetero_generations_waiting"):
            _metric(srv, name)


def test_a_request_joins_while_another_streams(tiny_engine):
    long_p, short_p = "Long running story:", "The quick brown fox jumps over the lazy dog " * 6
    app = create_app(tiny_engine, max_concurrency=4, max_queue=4, prefill_chunk=16, prefill_stall=0)
    slow_steps(app.state.scheduler, STEP_S)
    runner = app.state.scheduler.runner
    with Server(app) as srv:
        c = srv.client()
        want_long, want_short = _stream(c, long_p, 120), _stream(c, short_p, 10)  # each alone
        steps0 = runner.steps
        first = c.completions.create(model=MODEL, prompt=long_p, max_tokens=120, temperature=0, stream=True)
        it = iter(first)
        head = [next(it).choices[0].text for _ in range(5)]
        # the long prompt prefills in chunks between the running stream's tokens
        assert _stream(c, short_p, 10) == want_short
        rest, finish = [], None
        for ch in it:
            if ch.choices:
                rest.append(ch.choices[0].text or "")
                finish = ch.choices[0].finish_reason or finish
        assert ("".join(head + rest), finish) == want_long
        assert runner.steps - steps0 < 120 + 10  # the short one's tokens rode on the long one's steps


def test_a_pool_too_small_for_all_queues_them_and_all_complete(tiny_engine, alone):
    prompts = ["first prompt", "second prompt", "third prompt"]
    want = [alone(p, 40) for p in prompts]
    pool = BatchScheduler(tiny_engine).runner.pool
    # room for one request (prompt + 40 tokens: 4 blocks of 16) and a half
    kv = 6 * pool.block_bytes
    app = create_app(tiny_engine, max_concurrency=3, max_queue=8, kv_bytes=kv)
    runner = app.state.scheduler.runner
    assert runner.pool.n_blocks == 6
    slow_steps(app.state.scheduler, STEP_S)
    waited = []
    with Server(app) as srv:
        c = srv.client()
        done = threading.Event()

        def watch():
            while not done.is_set():
                waited.append(srv.scheduler.counts()[1])
                assert runner.pool.used_blocks <= runner.pool.n_blocks
                time.sleep(0.002)

        w = threading.Thread(target=watch)
        w.start()
        got = _concurrently([lambda p=p: _stream(c, p, 40) for p in prompts])
        done.set()
        w.join()
        assert got == want
        assert max(waited) >= 1  # some request waited for blocks, then ran
        # one that could never fit is refused in one clear line, not failed mid-stream
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=MODEL, prompt="x", max_tokens=200)
        assert "KV blocks" in str(e.value)


def test_a_full_queue_answers_429(tiny_engine):
    app = create_app(tiny_engine, max_concurrency=1, max_queue=0)
    slow_steps(app.state.scheduler, 0.02)
    with Server(app) as srv:
        c = srv.client()
        running = c.completions.create(model=MODEL, prompt="first", max_tokens=400, stream=True)
        next(iter(running))
        with pytest.raises(openai.RateLimitError):
            c.completions.create(model=MODEL, prompt="second", max_tokens=2)
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200  # its own place
        running.close()
        wait_until(lambda: srv.scheduler.counts() == (0, 0), timeout=2.0)


def test_a_disconnect_frees_its_blocks(tiny_engine):
    app = create_app(tiny_engine, max_concurrency=2, max_queue=2)
    slow_steps(app.state.scheduler, 0.02)
    runner = app.state.scheduler.runner
    with Server(app) as srv:
        c = srv.client()
        stream = c.completions.create(model=MODEL, prompt="long", max_tokens=400, temperature=0, stream=True)
        it = iter(stream)
        for _ in range(3):
            next(it)
        held = runner.pool.used_blocks
        assert held == runner.pool.blocks_for(len(tiny_engine.model.prompt_ids("long", chat=False)) + 400)
        t0 = time.monotonic()
        stream.close()
        wait_until(lambda: runner.pool.used_blocks == 0 and srv.scheduler.counts() == (0, 0), timeout=1.0)
        assert time.monotonic() - t0 < 1.0
        steps = runner.steps
        time.sleep(0.2)
        assert runner.steps == steps < 100  # nothing runs on for the client that left
        assert srv.app.state.metrics.counter_value("hetero_generations_total", outcome="cancelled") == 1


def test_pool_is_sized_from_the_plan(tiny_engine):
    from hetero.serve.kvsize import pool_bytes

    plan, net = tiny_engine.plan, tiny_engine.model.net
    tb = token_bytes(net)
    ctx = min(plan.context, net.spec.max_context)
    # between one whole context and max_concurrency of them
    for conc in (1, 4):
        b = pool_bytes(plan, tb, ctx, conc)
        assert tb * ctx <= b <= tb * ctx * conc
    s = BatchScheduler(tiny_engine, max_concurrency=4, context=ctx)
    assert s.runner.pool.n_blocks == pool_bytes(plan, tb, ctx, 4) // s.runner.pool.block_bytes


def test_a_repeated_prompt_is_served_from_the_prefix_cache(tiny_engine):
    app = create_app(tiny_engine, max_concurrency=2, max_queue=4, prefix_cache=True)
    prompt = "The quick brown fox jumps over the lazy dog " * 4  # several whole 16-token blocks
    n_prompt = len(tiny_engine.model.prompt_ids(prompt, chat=False))
    with Server(app) as srv:
        c = srv.client()
        first = _stream(c, prompt, 8)
        assert _metric(srv, "hetero_prefix_cached_tokens") == 0
        prefilled = _metric(srv, "hetero_batch_prefill_tokens_total")
        again = _stream(c, prompt, 8)
        cached = _metric(srv, "hetero_prefix_cached_tokens")
        assert cached == (n_prompt - 1) // 16 * 16 > 0
        # only the rest of the prompt ran
        assert _metric(srv, "hetero_batch_prefill_tokens_total") - prefilled == n_prompt - cached
        assert again[1] == first[1] == "length" and again[0]
        assert _metric(srv, "hetero_kv_blocks_cached") >= cached // 16
        assert _metric(srv, "hetero_kv_blocks_used") == 0
