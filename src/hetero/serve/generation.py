"""One completion or chat request from body to answer: parse, tokenise, queue on the scheduler, then
collect the records into one response or stream them as server-sent events."""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from hetero.errors import HeteroError
from hetero.serve import schemas
from hetero.serve.scheduler import END, Busy, Job
from hetero.serve.schemas import APIError
from hetero.serve.sse import Frames, sse
from hetero.serve.state import ServeState
from hetero.serve.waiting import next_item, next_items


class DisconnectAwareStream(StreamingResponse):
    """Always watch for the client going away while streaming (starlette skips this for ASGI ≥ 2.4,
    where a disconnect is only noticed at the next write — too late for a request still queued)."""

    async def __call__(self, scope, receive, send) -> None:
        scope = {**scope, "asgi": {**scope.get("asgi", {}), "spec_version": "2.3"}}
        await super().__call__(scope, receive, send)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past `limit` bytes whether or not Content-Length says so."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {int(declared)} bytes; this server accepts at most {limit}",
                       code="body_too_large")
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise APIError(413, f"the request body is over {limit} bytes, the most this server accepts",
                           code="body_too_large")
        chunks.append(part)
    return b"".join(chunks)


def _generation_error(e: Exception) -> APIError:
    if isinstance(e, (HeteroError, ValueError)):
        return APIError(400, str(e))
    return APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")


async def generate(request: Request, kind: str, state: ServeState):
    """Answer one /v1/completions ("completion") or /v1/chat/completions ("chat") request."""
    body = schemas.parse_json_object(await read_body(request, state.max_body_bytes))
    req = schemas.parse_request(body, kind, state.known)
    chat = kind == "chat"
    sched, model = state.scheduler, state.engine.model
    loop = asyncio.get_running_loop()
    try:
        ids = await loop.run_in_executor(None, sched.tokenize, lambda: model.prompt_ids(req.prompt, chat=chat))
    except HeteroError as e:
        raise APIError(400, str(e), param="messages" if chat else "prompt") from None
    schemas.check_context(req, len(ids), state.context)
    # top_p 0 keeps only the most likely token: greedy, which the sampler does without top_p.
    temperature, top_p = (0.0, 1.0) if req.top_p == 0.0 else (req.temperature, req.top_p)
    kwargs = dict(prompt=req.prompt, max_new_tokens=req.max_tokens, temperature=temperature, top_p=top_p,
                  seed=req.seed, chat=chat)
    job = Job(kwargs, loop, stop=req.stop)
    job.prompt_tokens, job.prompt_ids = req.prompt_tokens, ids
    try:
        sched.submit(job)
    except Busy:
        raise APIError(429, f"the server is busy: {sched.max_concurrency} requests running and {sched.max_queue} "
                       "waiting; retry shortly", type="rate_limit_error", code="server_busy",
                       headers={"Retry-After": "1"}) from None
    try:
        first = await next_item(job, request)
    except BaseException:
        job.cancel()
        raise
    if isinstance(first, Exception):
        raise _generation_error(first)
    if req.stream:
        return DisconnectAwareStream(_events(req, job, first), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _collect(req, job, first, request)


async def _collect(req: schemas.GenRequest, job: Job, item: Any, request: Request):
    text, finish, tokens, items = [], None, 0, [item]
    try:
        while True:
            for item in items:
                if item is END:
                    return schemas.full_response(req, "".join(text), finish, tokens)
                if isinstance(item, Exception):
                    raise _generation_error(item)
                text.append(item.text)
                finish, tokens = item.finish_reason or finish, item.generated_tokens
            items = await next_items(job, request)
    except BaseException:
        job.cancel()
        raise


async def _events(req: schemas.GenRequest, job: Job, first: Any) -> AsyncIterator[str]:
    """The event stream. Each write carries every record there is by then: one token when the client
    keeps up, several in one write when the engine is ahead of the socket."""
    frames = Frames(req)
    finish, tokens, ended = None, 0, False
    out = [sse(schemas.chunk(req, "", role=True))] if req.kind == "chat" else []
    items = [first]
    try:
        while True:
            for item in items:
                if item is END:
                    ended = True
                    break
                if isinstance(item, Exception):
                    out.append(sse(_generation_error(item).body()))
                    yield "".join(out)
                    return
                if item.text:
                    out.append(frames.delta(item.text))
                finish, tokens = item.finish_reason or finish, item.generated_tokens
            if ended:
                out.append(sse(schemas.chunk(req, None, finish or "stop")))
                if req.include_usage:
                    out.append(sse(schemas.usage_chunk(req, tokens)))
                out.append("data: [DONE]\n\n")
                yield "".join(out)
                return
            if out:
                yield "".join(out)
                out = []
            items = await next_items(job, None)  # the response watches for disconnects itself
    finally:
        # Runs on normal end and when the response task is cancelled by a disconnect.
        if not ended:
            job.cancel()
