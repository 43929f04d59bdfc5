"""Pure ASGI middleware (so streaming and disconnects pass through untouched): the API key check and
the per-route request count and latency."""
from __future__ import annotations

import hmac
import time

from fastapi.responses import JSONResponse

from hetero.serve.metrics import Metrics
from hetero.serve.schemas import error_body

ROUTES = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics", "/plan", "/report"}
OPEN_ROUTES = {"/health"}  # answered without the API key: load balancers probe it


class ServeMiddleware:
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
            if self.api_key and path not in OPEN_ROUTES and not self._authorised(scope):
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
