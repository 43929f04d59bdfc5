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


async def next_items(job: Job, request: Request | None, limit: int | None = None) -> list[Any]:
    """The job's next records, every one there now (at most `limit`), at least one: a Record, END or
    an exception. With `request`, cancels the job if the client disconnects, checked every
    DISCONNECT_POLL_S whether or not records keep arriving; without it (a streamed response watches
    for disconnects itself) records already there come back without waiting at all."""
    while True:
        if request is not None:
            now = time.perf_counter()
            if now - job.checked_at >= DISCONNECT_POLL_S:
                job.checked_at = now
                if await request.is_disconnected():
                    job.cancel()
                    raise ClientGone()
        items = job.out.take(limit)
        if items:
            return items
        waiter = job.out.wait()
        if waiter is None:
            continue
        if request is None:
            await waiter
        else:
            await asyncio.wait({waiter}, timeout=DISCONNECT_POLL_S)


async def next_item(job: Job, request: Request | None) -> Any:
    """The job's next record (or END or an exception)."""
    return (await next_items(job, request, 1))[0]
