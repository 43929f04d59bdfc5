"""Every bad request is a 4xx with an OpenAI-style error object, never a 500, and the server stays
healthy after each (a real one-token generation through /health)."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from hetero.serve.app import create_app

from .helpers import Server

MODEL = "synthetic:tiny"   # context 512, byte-level tokenizer: a prompt of n ASCII bytes is n tokens
LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def server(tiny_engine):
    with Server(create_app(tiny_engine, max_body_bytes=LIMIT)) as srv:
        yield srv


def body(**kw) -> bytes:
    return json.dumps({"model": MODEL, "prompt": "hello", **kw}).encode()


CASES = {
    "bad json": ("/v1/completions", b'{"model": "synthetic:tiny", "prompt": ', 400, None),
    "not utf-8": ("/v1/completions", b"\xff\xfe{}", 400, None),
    "array body": ("/v1/completions", b'[{"model": "synthetic:tiny"}]', 400, None),
    "string body": ("/v1/chat/completions", b'"hello"', 400, None),
    "empty body": ("/v1/completions", b"", 400, None),
    "missing model": ("/v1/completions", json.dumps({"prompt": "x"}).encode(), 400, "model"),
    "unknown model": ("/v1/completions", body(model="gpt-9"), 404, "model"),
    "unknown model (chat)": ("/v1/chat/completions",
                             json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}).encode(),
                             404, "model"),
    "max_tokens 0": ("/v1/completions", body(max_tokens=0), 400, "max_tokens"),
    "max_tokens negative": ("/v1/completions", body(max_tokens=-3), 400, "max_tokens"),
    "max_tokens not int": ("/v1/completions", body(max_tokens="ten"), 400, "max_tokens"),
    "max_tokens beyond context": ("/v1/completions", body(max_tokens=100_000), 400, "max_tokens"),
    "temperature too high": ("/v1/completions", body(temperature=2.5), 400, "temperature"),
    "temperature negative": ("/v1/completions", body(temperature=-0.1), 400, "temperature"),
    "temperature not a number": ("/v1/completions", body(temperature="hot"), 400, "temperature"),
    "top_p too high": ("/v1/completions", body(top_p=1.5), 400, "top_p"),
    "top_p negative": ("/v1/completions", body(top_p=-0.2), 400, "top_p"),
    "prompt not a string": ("/v1/completions", body(prompt={"a": 1}), 400, "prompt"),
    "empty prompt": ("/v1/completions", body(prompt=""), 400, "prompt"),
    "prompt alone over context": ("/v1/completions", body(prompt="x" * 600, max_tokens=1), 400, "prompt"),
    "n=2": ("/v1/completions", body(n=2), 400, "n"),
    "bad stop": ("/v1/completions", body(stop=[1, 2]), 400, "stop"),
    "too many stops": ("/v1/completions", body(stop=list("abcde")), 400, "stop"),
    "no messages": ("/v1/chat/completions", json.dumps({"model": MODEL}).encode(), 400, "messages"),
    "bad role": ("/v1/chat/completions",
                 json.dumps({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}).encode(),
                 400, "messages[0].role"),
    "image part": ("/v1/chat/completions",
                   json.dumps({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(),
                   400, "messages[0].content"),
    "oversized body": ("/v1/completions", body(prompt="x" * (LIMIT + 10)), 413, None),
}


def assert_error_object(r: httpx.Response, status: int, param) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["param"] == param
    return err


def assert_healthy(srv: Server) -> None:
    h = httpx.get(srv.url + "/health", timeout=30)
    assert h.status_code == 200 and h.json()["generated_tokens"] == 1


@pytest.mark.parametrize("name", list(CASES))
def test_bad_request_is_4xx_and_server_stays_healthy(server, name):
    path, raw, status, param = CASES[name]
    r = httpx.post(server.url + path, content=raw, headers={"Content-Type": "application/json"}, timeout=30)
    assert_error_object(r, status, param)
    assert_healthy(server)


def test_prompt_plus_max_tokens_over_context_names_both_numbers(server):
    r = httpx.post(server.url + "/v1/completions", content=body(prompt="y" * 400, max_tokens=200), timeout=30)
    err = assert_error_object(r, 400, "max_tokens")
    assert "400" in err["message"] and "200" in err["message"] and "512" in err["message"]
    assert err["code"] == "context_length_exceeded"
    # Exactly filling the context is allowed.
    ok = httpx.post(server.url + "/v1/completions", content=body(prompt="y" * 500, max_tokens=12), timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 12
    assert_healthy(server)


def test_oversized_chunked_body_without_length_is_refused(server):
    def gen():
        for _ in range(LIMIT // 1024 + 4):
            yield b"x" * 1024

    r = httpx.post(server.url + "/v1/completions", content=gen(), timeout=30)
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert_error_object(r, 413, None)
    assert_healthy(server)


def test_openai_client_sees_typed_errors(server):
    c = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt="hi", max_tokens=0)
    assert e.value.status_code == 400 and "max_tokens" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], top_p=3, stream=True)
    assert_healthy(server)


def test_no_500_was_ever_answered(server):
    # Runs last in this module: the server's own count of responses by status has no 5xx.
    text = httpx.get(server.url + "/metrics").text
    statuses = [line for line in text.splitlines() if line.startswith("hetero_requests_total")]
    assert any('status="400"' in s for s in statuses) and any('status="413"' in s for s in statuses)
    assert not any('status="5' in s for s in statuses), statuses
