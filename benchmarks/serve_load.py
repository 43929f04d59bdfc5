"""Load test for `hetero serve`: N concurrent streaming chat clients (the real `openai` client) for a
fixed time against a server started on a free loopback port; reports failures, time to first token
and inter-token latency (p50/p99) as measured by the clients.

    .venv/bin/python benchmarks/serve_load.py --model smollm2-135m --clients 8 --duration 120

Traffic is loopback only and bounded: no request starts after --duration, each is capped at
--max-tokens, and the server is stopped at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai

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


def client_loop(i: int, url: str, model: str, deadline: float, max_tokens: int, out: dict, lock: threading.Lock):
    c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    n = i
    while time.monotonic() < deadline:
        prompt = PROMPTS[n % len(PROMPTS)]
        n += 1
        t0 = time.monotonic()
        ttft, gaps, last, tokens, finish = None, [], None, 0, None
        try:
            stream = c.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=max_tokens, temperature=0.7, top_p=0.95, seed=n,
                                               stream=True, stream_options={"include_usage": True})
            for ch in stream:
                now = time.monotonic()
                if ch.usage is not None:
                    tokens = ch.usage.completion_tokens
                if not ch.choices:
                    continue
                if ch.choices[0].delta.content:
                    if ttft is None:
                        ttft = now - t0
                    else:
                        gaps.append(now - last)
                    last = now
                finish = ch.choices[0].finish_reason or finish
            ok = finish in ("stop", "length") and tokens > 0
            err = None if ok else f"finish={finish} tokens={tokens}"
        except Exception as e:  # any failure counts; the run goes on
            ok, err = False, f"{type(e).__name__}: {e}"
        with lock:
            out["requests"] += 1
            out["tokens"] += tokens
            if ok:
                out["ttft"].append(ttft if ttft is not None else time.monotonic() - t0)
                out["itl"] += gaps
            else:
                out["failed"] += 1
                out["errors"].append(err)


def run_phase(url: str, model: str, clients: int, duration: float, max_tokens: int) -> dict:
    out = {"requests": 0, "failed": 0, "tokens": 0, "ttft": [], "itl": [], "errors": []}
    lock = threading.Lock()
    t0 = time.monotonic()
    threads = [threading.Thread(target=client_loop, args=(i, url, model, t0 + duration, max_tokens, out, lock))
               for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    return {
        "clients": clients, "duration_s": duration, "wall_s": round(wall, 1), "max_tokens": max_tokens,
        "requests": out["requests"], "failed": out["failed"], "completion_tokens": out["tokens"],
        "aggregate_tok_s": round(out["tokens"] / wall, 2),
        "ttft_p50_s": round(pct(out["ttft"], 50), 3), "ttft_p99_s": round(pct(out["ttft"], 99), 3),
        "itl_p50_s": round(pct(out["itl"], 50), 4), "itl_p99_s": round(pct(out["itl"], 99), 4),
        "itl_mean_s": round(statistics.fmean(out["itl"]), 4) if out["itl"] else None,
        "inter_token_samples": len(out["itl"]), "errors": out["errors"][:5],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=120.0, help="seconds during which requests start")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--baseline", type=float, default=0.0,
                    help="first run ONE client this many seconds on the same server, for a side-by-side reference")
    ap.add_argument("--json", dest="json_out", help="also write the results here")
    a = ap.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    hetero = str(Path(sys.executable).with_name("hetero"))
    server = subprocess.Popen([hetero, "serve", a.model, "--dtype", a.dtype, "--port", str(port),
                               "--max-concurrency", str(a.clients)], env=os.environ.copy())
    try:
        t_start = time.monotonic()
        while True:
            if server.poll() is not None:
                sys.exit(f"server exited with {server.returncode}")
            try:
                if httpx.get(url + "/health", timeout=60).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() - t_start > 180:
                sys.exit("server did not come up")
            time.sleep(0.5)
        base = run_phase(url, a.model, 1, a.baseline, a.max_tokens) if a.baseline > 0 else None
        res = run_phase(url, a.model, a.clients, a.duration, a.max_tokens)
        res["health_after"] = httpx.get(url + "/health", timeout=60).json()["status"]
    finally:
        server.terminate()
        server.wait(30)
    res = {"model": a.model, "dtype": a.dtype, **res}
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
