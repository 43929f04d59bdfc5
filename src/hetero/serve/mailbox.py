"""Records from the scheduler's worker thread to one handler on the event loop.

The worker appends; the loop is woken (one call_soon_threadsafe) only when the handler is parked
waiting. A handler still busy writing earlier tokens finds the new ones already there and takes
them all at once, with no wake-up, task or timer per token.
"""
from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any


def _release(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class Mailbox:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: deque = deque()
        self.lock = threading.Lock()
        self.waiter: asyncio.Future | None = None

    # ---- worker thread ----
    def put(self, item: Any) -> None:
        with self.lock:
            self.items.append(item)
            waiter, self.waiter = self.waiter, None
        if waiter is not None:
            try:
                self.loop.call_soon_threadsafe(_release, waiter)
            except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
                pass

    # ---- event loop ----
    def take(self, limit: int | None = None) -> list:
        """The items there now, oldest first (at most `limit`); [] when there are none."""
        with self.lock:
            if limit is None or limit >= len(self.items):
                out = list(self.items)
                self.items.clear()
            else:
                out = [self.items.popleft() for _ in range(limit)]
        return out

    def wait(self) -> asyncio.Future | None:
        """None if items are there; else a future that is done once the next one is."""
        with self.lock:
            if self.items:
                return None
            self.waiter = self.loop.create_future()
            return self.waiter
