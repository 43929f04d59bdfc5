"""Waiting on a job's records from a handler while watching that its client is still there."""
from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import Request

from hetero.serve.scheduler import Job

DISCONNECT_POLL_S = 0.25  # how often a waiting request checks its client is still there


class ClientGone(Exception):
    """The client disconnected while its request waited or ran; its job is already cancelled."""


async def next_item(job: Job, request: Request | None) -> Any:
    """The job's next record (or END or an exception); cancels the job if the client disconnects.
    The client is checked every DISCONNECT_POLL_S whether or not records keep arriving."""
    getter = asyncio.ensure_future(job.out.get())
    try:
        while True:
            now = time.perf_counter()
            if request is not None and now - job.checked_at >= DISCONNECT_POLL_S:
                job.checked_at = now
                if await request.is_disconnected():
                    job.cancel()
                    raise ClientGone()
            done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
            if done:
                return getter.result()
    finally:
        if not getter.done():
            getter.cancel()
