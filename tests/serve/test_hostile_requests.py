"""Hostile requests: deep JSON, lone surrogates, short or slow bodies, a bare API key. The parsing
guards in schemas are live in the app; RequestLimits (serve/limits.py) is tested directly and on
the real app, whose create_app installs RequestLimits."""
from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest

from hetero.serve.limits import RequestLimits, bearer_token
from hetero.serve.schemas import APIError, json_depth, parse_json_object


@pytest.mark.parametrize("raw,depth", [(b"[]", 1), (b'{"a": [1, {"b": "[[[["}]}', 3),
                                       (b'{"a": "\\\\\\"[[["}', 1), (b"[" * 100000 + b"]" * 100000, 100000)])
def test_json_depth_skips_strings(raw, depth):
    assert json_depth(raw) == depth


@pytest.mark.parametrize("raw,code", [
    (b"[" * 100000 + b"]" * 100000, "invalid_json"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "invalid_unicode"),
    (b'{"\\udfff": 1}', "invalid_unicode"),
    (b'{"prompt": "\xff"}', "invalid_json"),
])
def test_hostile_bodies_are_400(raw, code):
    with pytest.raises(APIError) as e:
        parse_json_object(raw)
    assert e.value.status == 400 and e.value.code == code


def test_a_surrogate_pair_is_fine():
    assert parse_json_object(b'{"prompt": "\\ud83d\\ude00"}') == {"prompt": "\U0001F600"}


def test_bearer_token_needs_the_scheme():
    assert bearer_token([(b"authorization", b"Bearer k1")]) == "k1"
    assert bearer_token([(b"Authorization", b"bearer  k1 ")]) == "k1"
    assert bearer_token([(b"authorization", b"k1")]) is None
    assert bearer_token([(b"authorization", b"Basic k1")]) is None
    assert bearer_token([]) is None


async def _echo_body(scope, receive, send):
    body = b""
    while True:
        m = await receive()
        body += m.get("body", b"")
        if not m.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def _call(app, headers, chunks, delay=0.0, path="/v1/completions"):
    """Drive an ASGI app with a body sent as `chunks` (None: the client stops sending)."""
    sent = []

    async def main():
        queue = list(chunks)

        async def receive():
            if not queue or queue[0] is None:
                await asyncio.sleep(3600)
            await asyncio.sleep(delay)
            c = queue.pop(0)
            return {"type": "http.request", "body": c, "more_body": bool(queue)}

        async def send(m):
            sent.append(m)

        scope = {"type": "http", "path": path, "headers": headers, "method": "POST"}
        await asyncio.wait_for(app(scope, receive, send), timeout=10)

    asyncio.run(main())
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def test_a_body_shorter_than_promised_gets_408():
    app = RequestLimits(_echo_body, idle_s=0.2)
    status, body = _call(app, [], [b"{", None])
    assert status == 408 and b"request_timeout" in body


def test_a_slow_body_gets_408_at_the_total_limit():
    app = RequestLimits(_echo_body, idle_s=1.0, total_s=0.5)
    t0 = time.monotonic()
    status, _ = _call(app, [], [b"x"] * 50, delay=0.05)
    assert status == 408 and time.monotonic() - t0 < 2


def test_a_prompt_body_passes():
    assert _call(RequestLimits(_echo_body, idle_s=0.5), [], [b"ab", b"cd"]) == (200, b"abcd")


@pytest.mark.parametrize("auth,status", [(b"Bearer k1", 200), (b"k1", 401), (b"Bearer k2", 401), (None, 401)])
def test_only_bearer_keys_pass(auth, status):
    headers = [(b"authorization", auth)] if auth else []
    assert _call(RequestLimits(_echo_body, api_key="k1"), headers, [b"x"])[0] == status
    assert _call(RequestLimits(_echo_body, api_key="k1"), [], [b"x"], path="/health")[0] == 200


@pytest.fixture(scope="module")
def guarded_server(tiny_engine):
    from hetero.serve.app import create_app

    from .helpers import Server

    app = create_app(tiny_engine, api_key="k1", body_idle_s=0.5)  # RequestLimits is part of the app
    with Server(app) as srv:
        yield srv


def _raw(srv, request: bytes, wait: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=wait) as s:
        s.sendall(request)
        out = b""
        try:
            while b"\r\n\r\n" not in out or not _complete(out):
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except socket.timeout:
            pass
        return out


def _complete(resp: bytes) -> bool:
    head, _, body = resp.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def _post(body: bytes, length: int | None = None, auth: bytes = b"Bearer k1") -> bytes:
    n = len(body) if length is None else length
    return (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: " + auth + b"\r\nContent-Length: " + str(n).encode() + b"\r\n\r\n" + body)


def _status(resp: bytes) -> int:
    return int(resp.split(b" ", 2)[1])


def test_the_app_answers_4xx_and_stays_healthy(guarded_server):
    srv = guarded_server
    deep = b"[" * 100000 + b"]" * 100000
    assert _status(_raw(srv, _post(deep))) == 400
    lone = json.dumps({"model": "x", "prompt": "\ud800"}).encode()
    assert _status(_raw(srv, _post(lone))) == 400
    t0 = time.monotonic()
    assert _status(_raw(srv, _post(b'{"prompt": "hi"', length=500))) == 408
    assert time.monotonic() - t0 < 4
    assert _status(_raw(srv, _post(b'{"prompt": "hi"}', auth=b"k1"))) == 401
    # The same keep-alive connection after a 400 still serves the next request.
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
        s.sendall(_post(deep) + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        buf = b""
        while buf.count(b"HTTP/1.1 ") < 2 or not _complete(buf[buf.rindex(b"HTTP/1.1 "):]):
            chunk = s.recv(65536)
            assert chunk, buf
            buf += chunk
    second = buf.rindex(b"HTTP/1.1 ")
    assert _status(buf) == 400 and _status(buf[second:]) == 200
