"""The OpenAI-compatible HTTP API: `create_app(model)` returns a FastAPI app serving a ready Model.

Routes: GET /v1/models, POST /v1/completions and /v1/chat/completions (streamed as SSE or not),
GET /health (a real one-token generation), GET /metrics (Prometheus text), GET /plan.
The app takes any object with the Model interface (`stream`, `prompt_ids`, `spec`, `net`), so a
planned engine can be served unchanged; `plan` is the dict GET /plan returns.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hetero.errors import HeteroError
from hetero.runtime.memory import peak_rss_bytes
from hetero.serve import schemas
from hetero.serve.metrics import Metrics
from hetero.serve.queue import END, Busy, Engine, Job
from hetero.serve.schemas import APIError, error_body

DEFAULT_MAX_BODY = 1 << 20       # 1 MiB: far above any prompt that fits a context
DISCONNECT_POLL_S = 0.25         # how often a waiting non-streamed request checks its client is still there
ROUTES = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics", "/plan"}


def default_plan(model: Any, dtype: str | None = None) -> dict:
    """What GET /plan shows when no Plan was given: the placement the model actually runs with."""
    units = [{"unit": u, "device": c.device, "precision": c.precision} for u, c in model.net.units.items()]
    precisions = {u["precision"] for u in units}
    return {"model": model.spec.name, "dtype": dtype or (precisions.pop() if len(precisions) == 1 else "mixed"),
            "context": model.spec.max_context, "units": units}


class DisconnectAwareStream(StreamingResponse):
    """Always watch for the client going away while streaming (starlette skips this for ASGI ≥ 2.4,
    where a disconnect is only noticed at the next write — too late for a request still queued)."""

    async def __call__(self, scope, receive, send) -> None:
        scope = {**scope, "asgi": {**scope.get("asgi", {}), "spec_version": "2.3"}}
        await super().__call__(scope, receive, send)


class ServeMiddleware:
    """Pure ASGI (so streaming and disconnects pass through untouched): the API key check and the
    per-route request count and latency."""

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = path if path in ROUTES else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.api_key and path != "/health" and not self._authorised(scope):
                body = error_body("missing or wrong API key: send 'Authorization: Bearer KEY'",
                                  "invalid_request_error", None, "invalid_api_key")
                await JSONResponse(body, status_code=401)(scope, receive, send_wrapped)
                return
            await self.app(scope, receive, send_wrapped)
        finally:
            self.metrics.inc("hetero_requests_total", route=route, status=str(status["code"]))
            self.metrics.observe("hetero_request_duration_seconds", time.perf_counter() - t0, route=route)

    def _authorised(self, scope) -> bool:
        for k, v in scope.get("headers", []):
            if k == b"authorization":
                value = v.decode("latin-1")
                token = value[7:] if value.lower().startswith("bearer ") else value
                return hmac.compare_digest(token.strip().encode(), self.api_key.encode())
        return False


async def _read_body(request: Request, limit: int) -> bytes:
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


class ClientGone(Exception):
    """The client disconnected while its request waited or ran; its job is already cancelled."""


async def _next_item(job: Job, request: Request | None) -> Any:
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


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _generation_error(e: Exception) -> APIError:
    if isinstance(e, (HeteroError, ValueError)):
        return APIError(400, str(e))
    return APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")


def create_app(model: Any, model_id: str | None = None, aliases: tuple[str, ...] = (), plan: dict | None = None,
               dtype: str | None = None, api_key: str | None = None, max_concurrency: int = 8,
               max_queue: int = 64, max_body_bytes: int = DEFAULT_MAX_BODY) -> FastAPI:
    model_id = model_id or model.spec.name
    known = {model_id, model.spec.name, *[a for a in aliases if a]}
    context = model.spec.max_context
    metrics = Metrics()

    def on_token(job: Job, now: float) -> None:
        if job.priority:
            return
        if job.t_first is None:
            metrics.observe("hetero_time_to_first_token_seconds", now - job.t_submit)
            metrics.observe("hetero_queue_wait_seconds", (job.t_start or now) - job.t_submit)
        else:
            metrics.observe("hetero_inter_token_latency_seconds", now - job.t_last)

    def on_done(job: Job, outcome: str) -> None:
        if job.priority:
            return
        metrics.inc("hetero_generations_total", outcome=outcome)
        metrics.inc("hetero_generated_tokens_total", job.tokens)
        metrics.inc("hetero_prompt_tokens_total", job.prompt_tokens)

    engine = Engine(model, max_concurrency, max_queue, on_token, on_done)
    _register_gauges(metrics, engine, model)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="hetero", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.model_id = engine, metrics, model_id
    app.add_middleware(ServeMiddleware, api_key=api_key, metrics=metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, e: ClientGone):
        return PlainTextResponse("", status_code=499)  # nobody reads it; nginx's "client closed request"

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {e.detail}", code=code),
                            status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return JSONResponse(error_body(f"invalid request: {e.errors()}"), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"),
                            status_code=500)

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "hetero",
                "context_length": context}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        if name not in known:
            raise APIError(404, f"the model {name!r} does not exist here", param="model", code="model_not_found")
        return model_card()

    async def generate(request: Request, kind: str):
        body = schemas.parse_json_object(await _read_body(request, max_body_bytes))
        req = schemas.parse_request(body, kind, known)
        chat = kind == "chat"
        loop = asyncio.get_running_loop()
        try:
            ids = await loop.run_in_executor(None, engine.tokenize, lambda: model.prompt_ids(req.prompt, chat=chat))
        except HeteroError as e:
            raise APIError(400, str(e), param="messages" if chat else "prompt") from None
        schemas.check_context(req, len(ids), context)
        # top_p 0 keeps only the most likely token: greedy, which the sampler does without top_p.
        temperature, top_p = (0.0, 1.0) if req.top_p == 0.0 else (req.temperature, req.top_p)
        kwargs = dict(prompt=req.prompt, max_new_tokens=req.max_tokens, temperature=temperature, top_p=top_p,
                      seed=req.seed, chat=chat)
        job = Job(kwargs, loop, stop=req.stop)
        job.prompt_tokens = req.prompt_tokens
        try:
            engine.submit(job)
        except Busy:
            raise APIError(429, f"the server is busy: {max_concurrency} requests running and {max_queue} waiting; "
                           "retry shortly", type="rate_limit_error", code="server_busy",
                           headers={"Retry-After": "1"}) from None
        try:
            first = await _next_item(job, request)
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
        text, finish, tokens = [], None, 0
        try:
            while item is not END:
                if isinstance(item, Exception):
                    raise _generation_error(item)
                text.append(item.text)
                finish, tokens = item.finish_reason or finish, item.generated_tokens
                item = await _next_item(job, request)
        except BaseException:
            job.cancel()
            raise
        return schemas.full_response(req, "".join(text), finish, tokens)

    async def _events(req: schemas.GenRequest, job: Job, item: Any) -> AsyncIterator[str]:
        finish, tokens = None, 0
        try:
            if req.kind == "chat":
                yield _sse(schemas.chunk(req, "", role=True))
            while item is not END:
                if isinstance(item, Exception):
                    yield _sse(_generation_error(item).body())
                    return
                if item.text:
                    yield _sse(schemas.chunk(req, item.text))
                finish, tokens = item.finish_reason or finish, item.generated_tokens
                item = await _next_item(job, None)  # the response watches for disconnects itself
            yield _sse(schemas.chunk(req, None, finish or "stop"))
            if req.include_usage:
                yield _sse(schemas.usage_chunk(req, tokens))
            yield "data: [DONE]\n\n"
        finally:
            # Runs on normal end and when the response task is cancelled by a disconnect.
            if item is not END:
                job.cancel()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, "chat")

    @app.get("/health")
    async def health(request: Request):
        """A real one-token generation through the queue (ahead of waiting requests)."""
        loop = asyncio.get_running_loop()
        job = Job(dict(prompt="Hello", max_new_tokens=1, temperature=0.0, chat=False), loop, priority=True)
        t0 = time.perf_counter()
        engine.submit(job)
        tokens, error = 0, None
        try:
            item = await _next_item(job, request)
            while item is not END:
                if isinstance(item, Exception):
                    error = f"{type(item).__name__}: {item}"
                    break
                tokens += len(item.token_ids)
                item = await _next_item(job, request)
        except BaseException:
            job.cancel()
            raise
        running, waiting = engine.counts()
        body = {"status": "ok" if tokens == 1 and error is None else "error", "model": model_id,
                "generated_tokens": tokens, "seconds": round(time.perf_counter() - t0, 4),
                "running": running, "waiting": waiting}
        if body["status"] != "ok":
            body["error"] = error or f"expected 1 token, got {tokens}"
            return JSONResponse(body, status_code=503)
        return body

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/plan")
    async def get_plan():
        return plan if plan is not None else default_plan(model, dtype)

    return app


def _register_gauges(metrics: Metrics, engine: Engine, model: Any) -> None:
    import psutil

    proc = psutil.Process()
    weights: dict[tuple, float] = {}
    for unit, cfg in model.net.units.items():
        key = (("device", cfg.device),)
        weights[key] = weights.get(key, 0.0) + model.spec.unit_bytes(unit, cfg.precision)
    metrics.gauge("hetero_generations_running", lambda: {(): engine.counts()[0]})
    metrics.gauge("hetero_generations_waiting", lambda: {(): engine.counts()[1]})
    metrics.gauge("hetero_process_resident_bytes", lambda: {(): proc.memory_info().rss})
    # ru_maxrss is KiB on Linux.
    metrics.gauge("hetero_process_peak_resident_bytes",
                  lambda: {(): peak_rss_bytes()})
    metrics.gauge("hetero_model_weight_bytes", lambda: dict(weights))
    metrics.gauge("hetero_model_context_tokens", lambda: {(): model.spec.max_context})
