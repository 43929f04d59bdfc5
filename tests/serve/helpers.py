"""A real uvicorn server on a free loopback port in a background thread, and a slowed engine."""
from __future__ import annotations

import socket
import threading
import time

import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`with Server(app) as srv:` serves `app` on http://127.0.0.1:<free port> until the block ends."""

    def __init__(self, app):
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    @property
    def scheduler(self):
        return self.app.state.scheduler

    def client(self, api_key: str = "none", **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=30, **kw)


class SlowEngine:
    """A real engine whose every token takes at least `delay` seconds: a stand-in for a long generation
    on a big model, so cancellation can be timed against something that would otherwise keep running."""

    def __init__(self, engine, delay: float):
        self.engine, self.delay = engine, delay
        self.plan, self.model = engine.plan, engine.model
        self.report, self.over_budget, self.footprint = engine.report, engine.over_budget, engine.footprint
        self.tokens_made = 0

    def stream(self, *args, **kwargs):
        for rec in self.engine.stream(*args, **kwargs):
            time.sleep(self.delay)
            self.tokens_made += 1
            yield rec


def wait_until(cond, timeout: float, step: float = 0.01) -> float:
    """Seconds until cond() held; raises AssertionError after `timeout`."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(step)
    return time.monotonic() - t0


def slow_steps(scheduler, delay: float) -> None:
    """Make every batched step of a BatchScheduler take at least `delay` seconds: a stand-in for a
    big model's step, so requests overlap and cancellation can be timed."""
    runner = scheduler.runner
    step = runner.step

    def slowed():
        events = step()
        time.sleep(delay)
        return events

    runner.step = slowed
