"""Request-level protections as one pure ASGI middleware, outside the routes:

- a body that arrives too slowly, or stops short of its Content-Length, is answered 408 instead of
  holding a worker and a connection open forever;
- with an API key set, only `Authorization: Bearer KEY` is accepted (a bare key is refused 401).

Wired in create_app with `app.add_middleware(RequestLimits, api_key=api_key)`.
"""
from __future__ import annotations

import asyncio
import hmac
import json

BODY_IDLE_S = 10.0      # the longest wait for the next piece of a body
BODY_TOTAL_S = 60.0     # the longest a whole body may take to arrive
OPEN_PATHS = ("/health",)


def bearer_token(headers) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header (scheme case-insensitive), else None."""
    for k, v in headers:
        if k.lower() == b"authorization":
            value = v.decode("latin-1")
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


class BodyTimeout(Exception):
    pass


async def _send_error(send, status: int, message: str, code: str, extra: list | None = None) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestLimits:
    def __init__(self, app, api_key: str | None = None, idle_s: float = BODY_IDLE_S,
                 total_s: float = BODY_TOTAL_S):
        self.app, self.api_key, self.idle_s, self.total_s = app, api_key, idle_s, total_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key and scope.get("path", "") not in OPEN_PATHS:
            token = bearer_token(scope.get("headers", []))
            if token is None or not hmac.compare_digest(token.encode(), self.api_key.encode()):
                return await _send_error(send, 401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                         "invalid_api_key", [(b"www-authenticate", b"Bearer")])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.total_s
        started = {"response": False, "body_done": False}

        async def timed_receive():
            if started["body_done"]:
                return await receive()  # after the body: only a disconnect is left to wait for
            left = min(self.idle_s, deadline - loop.time())
            try:
                message = await asyncio.wait_for(receive(), timeout=max(left, 0.001))
            except asyncio.TimeoutError:
                raise BodyTimeout() from None
            if message["type"] == "http.request" and not message.get("more_body", False):
                started["body_done"] = True
            return message

        async def tracked_send(message):
            if message["type"] == "http.response.start":
                started["response"] = True
            await send(message)

        try:
            await self.app(scope, timed_receive, tracked_send)
        except BodyTimeout:
            if not started["response"]:
                await _send_error(send, 408, "the request body did not arrive in time (shorter than its "
                                  "Content-Length, or too slow)", "request_timeout", [(b"connection", b"close")])
