"""Load test for any OpenAI-compatible server: N concurrent streaming chat clients for a duration or a
request count; reports aggregate tok/s, per-stream decode tok/s, time to first token and inter-token
latency (p50/p99) as the clients measure them, and failed requests, as JSON.

    # a server already running (hetero serve, llama-server, ...)
    .venv/bin/python benchmarks/serve_load.py --url http://127.0.0.1:8080 --clients 8 --duration 120
    # or let it start `hetero serve MODEL` on a free loopback port and stop it at the end
    .venv/bin/python benchmarks/serve_load.py --model smollm2-135m --clients 8 --duration 120

The clients are one asyncio loop reading the event stream line by line (no SDK objects per chunk), so
the load generator takes as little as possible of the CPU the server under test runs on. Tokens are
counted from the final usage chunk when the server sends one, else one per content chunk.
Traffic is loopback or the given URL only, and bounded: no request starts after --duration (or past
--requests), each is capped at --max-tokens.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a CPU cache is in two sentences.",
    "Give me three tips for learning a new language.",
    "What is 17 times 23?",
    "Describe a cat to someone who has never seen one.",
    "Why is the sky blue?",
    "Name four planets of the solar system.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """One streamed chat completion: ttft, inter-token gaps, tokens, finish reason (or error)."""
    t0 = time.perf_counter()
    ttft, last, gaps, chunks, usage_tokens, finish = None, None, [], 0, None, None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            ch = json.loads(data)
            if ch.get("usage"):
                usage_tokens = ch["usage"].get("completion_tokens")
            for c in ch.get("choices") or []:
                if (c.get("delta") or {}).get("content"):
                    now = time.perf_counter()
                    if ttft is None:
                        ttft = now - t0
                    else:
                        gaps.append(now - last)
                    last = now
                    chunks += 1
                finish = c.get("finish_reason") or finish
    tokens = usage_tokens if usage_tokens is not None else chunks
    if finish not in ("stop", "length") or not tokens:
        return {"error": f"finish={finish} tokens={tokens}"}
    # per-stream decode rate: the tokens after the first over the time after the first
    span = (last - t0 - ttft) if ttft is not None and last is not None else 0.0
    rate = (chunks - 1) / span if chunks > 1 and span > 0 else None
    return {"ttft": ttft, "gaps": gaps, "tokens": tokens, "decode_tok_s": rate}


async def run_phase(url: str, model: str, clients: int, duration: float | None, requests: int | None,
                    max_tokens: int, temperature: float, api_key: str | None, prompts: list[str] = PROMPTS,
                    top_p: float = 1.0, unique: bool = False) -> dict:
    out = {"requests": 0, "failed": 0, "tokens": 0, "ttft": [], "itl": [], "rates": [], "errors": []}
    t0 = time.perf_counter()
    deadline = t0 + duration if duration else None
    started = 0
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def worker(i: int, client: httpx.AsyncClient) -> None:
        nonlocal started
        n = i
        while (deadline is None or time.perf_counter() < deadline) and (requests is None or started < requests):
            started += 1
            n += clients
            text = prompts[n % len(prompts)]
            if unique:  # no two requests share more than the chat template's opening
                text = f"Request {started}: {text}"
            body = {"model": model, "messages": [{"role": "user", "content": text}],
                    "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": n, "stream": True,
                    "stream_options": {"include_usage": True}}
            try:
                res = await one_request(client, url, body)
            except Exception as e:  # any failure counts; the run goes on
                res = {"error": f"{type(e).__name__}: {e}"}
            out["requests"] += 1
            if "error" in res:
                out["failed"] += 1
                out["errors"].append(res["error"])
                continue
            out["tokens"] += res["tokens"]
            out["ttft"].append(res["ttft"])
            out["itl"] += res["gaps"]
            if res["decode_tok_s"]:
                out["rates"].append(res["decode_tok_s"])

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits, headers=headers) as client:
        await asyncio.gather(*(worker(i, client) for i in range(clients)))
    wall = time.perf_counter() - t0
    r3 = lambda x: round(x, 4) if x == x else None  # NaN (no samples) -> null
    return {
        "clients": clients, "duration_s": duration, "request_limit": requests, "wall_s": round(wall, 2),
        "max_tokens": max_tokens, "requests": out["requests"], "failed": out["failed"],
        "completion_tokens": out["tokens"], "aggregate_tok_s": round(out["tokens"] / wall, 2),
        "stream_decode_tok_s_p50": r3(pct(out["rates"], 50)),
        "ttft_p50_s": r3(pct(out["ttft"], 50)), "ttft_p99_s": r3(pct(out["ttft"], 99)),
        "itl_p50_s": r3(pct(out["itl"], 50)), "itl_p99_s": r3(pct(out["itl"], 99)),
        "itl_mean_s": round(statistics.fmean(out["itl"]), 5) if out["itl"] else None,
        "inter_token_samples": len(out["itl"]), "errors": out["errors"][:5],
    }


def wait_up(url: str, server: subprocess.Popen | None, timeout: float = 180) -> None:
    t_start = time.monotonic()
    while True:
        if server is not None and server.poll() is not None:
            sys.exit(f"server exited with {server.returncode}")
        try:
            if httpx.get(url + "/health", timeout=60).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() - t_start > timeout:
            sys.exit(f"no healthy server at {url} within {timeout:.0f} s")
        time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="drive the server at this base URL (without /v1) instead of starting one")
    ap.add_argument("--model", default="smollm2-135m", help="the model to serve (and the id sent in requests)")
    ap.add_argument("--model-name", help="the model id sent in requests (default: --model)")
    ap.add_argument("--dtype", help="`hetero serve --dtype` when this script starts the server")
    ap.add_argument("--api-key", help="send 'Authorization: Bearer KEY'")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, help="seconds during which requests start (default 120)")
    ap.add_argument("--requests", type=int, help="stop after this many requests (instead of a duration)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--prompt", help="send this one prompt (default: a round of eight short questions)")
    ap.add_argument("--baseline", type=float, default=0.0,
                    help="first run ONE client this many seconds on the same server, for a side-by-side reference")
    ap.add_argument("--unique-prompts", action="store_true",
                    help="start each request's question with its own number, so that a server's prompt cache "
                         "saves at most the chat template's opening (the default round of eight repeats)")
    ap.add_argument("--json", dest="json_out", help="also write the results here")
    a = ap.parse_args()
    if a.clients < 1:
        sys.exit("--clients must be ≥ 1")
    prompts = [a.prompt] if a.prompt else PROMPTS
    duration = a.duration if a.duration is not None else (None if a.requests else 120.0)

    server = None
    url = a.url.rstrip("/") if a.url else None
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        hetero = str(Path(sys.executable).with_name("hetero"))
        cmd = [hetero, "serve", a.model, "--port", str(port), "--max-concurrency", str(a.clients)]
        server = subprocess.Popen(cmd + (["--dtype", a.dtype] if a.dtype else []), env=os.environ.copy())
    model = a.model_name or a.model
    try:
        wait_up(url, server)
        base = None
        if a.baseline > 0:
            base = asyncio.run(run_phase(url, model, 1, a.baseline, None, a.max_tokens, a.temperature, a.api_key,
                                         prompts, a.top_p))
        res = asyncio.run(run_phase(url, model, a.clients, duration, a.requests, a.max_tokens, a.temperature,
                                    a.api_key, prompts, a.top_p, a.unique_prompts))
        res["unique_prompts"] = a.unique_prompts
        try:
            res["health_after"] = httpx.get(url + "/health", timeout=60).json().get("status")
        except (httpx.HTTPError, ValueError):
            res["health_after"] = None
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    res = {"url": url, "model": model, **res}
    if base is not None:
        res["baseline_1_client"] = base
    print(json.dumps(res, indent=1))
    if a.json_out:
        tmp = a.json_out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, a.json_out)


if __name__ == "__main__":
    main()
