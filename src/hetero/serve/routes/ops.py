"""For operators: GET /health (a real one-token generation), /metrics (Prometheus text), /plan (the
Plan being served, as `hetero plan -o` writes it) and /report (predicted vs measured, budgets)."""
from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from hetero.serve.scheduler import END, Job
from hetero.serve.state import ServeState, get_state
from hetero.serve.waiting import next_item

router = APIRouter()


@router.get("/health")
async def health(request: Request, state: ServeState = Depends(get_state)):
    """A real one-token generation through the scheduler (ahead of waiting requests)."""
    loop = asyncio.get_running_loop()
    job = Job(dict(prompt="Hello", max_new_tokens=1, temperature=0.0, chat=False), loop, priority=True)
    t0 = time.perf_counter()
    state.scheduler.submit(job)
    tokens, error = 0, None
    try:
        item = await next_item(job, request)
        while item is not END:
            if isinstance(item, Exception):
                error = f"{type(item).__name__}: {item}"
                break
            tokens += len(item.token_ids)
            item = await next_item(job, request)
    except BaseException:
        job.cancel()
        raise
    running, waiting = state.scheduler.counts()
    body = {"status": "ok" if tokens == 1 and error is None else "error", "model": state.model_id,
            "generated_tokens": tokens, "seconds": round(time.perf_counter() - t0, 4),
            "running": running, "waiting": waiting}
    if body["status"] != "ok":
        body["error"] = error or f"expected 1 token, got {tokens}"
        return JSONResponse(body, status_code=503)
    return body


@router.get("/metrics")
async def prometheus(state: ServeState = Depends(get_state)):
    return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/plan")
async def plan(state: ServeState = Depends(get_state)):
    return state.engine.plan.to_dict()


@router.get("/report")
async def report(state: ServeState = Depends(get_state)):
    """The engine's report (the last generation's speeds, peak footprint since start) and, as
    `hetero run --json` does, the devices over budget."""
    rep = state.engine.report()
    over = state.watch.check()
    return {**rep, "over_budget": {d: {"measured": m, "budget": b} for d, (m, b) in over.items()}}
