"""Chunked prefill under load: a long prompt arrives while N streams decode; how much do their
inter-token gaps grow while it is prefilled?

    # starts `hetero serve MODEL --max-concurrency N+1 [--prefill-chunk C] [--prefill-stall S]` on a loopback port
    .venv/bin/python benchmarks/prefill_stall.py --model smollm2-135m --streams 7 --prompt-tokens 2000
    # or a server already running
    .venv/bin/python benchmarks/prefill_stall.py --url http://127.0.0.1:8080 --model smollm2-135m

The N streams start first (long generations, so they decode throughout); after --warmup seconds one
request with a prompt of about --prompt-tokens tokens (one token to generate) is sent. Each stream's
token arrival times are kept; a gap is "during the prefill" when it ends between the long request's
send and its first token. Reports, as JSON: the streams' gap p50 before it was sent, their gap p50 and
p99 during its prefill, p99 during / p50 before (chunked prefill keeps this small), and the long
prompt's time to first token. Traffic is loopback or the given URL only.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import free_port, pct, wait_up  # noqa: E402

FILLER = "The quick brown fox jumps over the lazy dog near the quiet river bank. "  # ~15 tokens


async def stream_times(client: httpx.AsyncClient, url: str, body: dict) -> list[float]:
    """Arrival times (perf_counter) of each content chunk of one streamed chat completion."""
    times = []
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line[6:] == "[DONE]":
                continue
            for c in json.loads(line[6:]).get("choices") or []:
                if (c.get("delta") or {}).get("content"):
                    times.append(time.perf_counter())
    return times


async def run(url: str, model: str, streams: int, prompt_tokens: int, warmup: float, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=streams + 1, max_keepalive_connections=streams + 1)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        def body(text: str, n: int, seed: int) -> dict:
            return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": n,
                    "temperature": 0.7, "top_p": 0.95, "seed": seed, "stream": True}

        tasks = [asyncio.create_task(stream_times(client, url, body(f"Tell me a long story, number {i}.", max_tokens, i)))
                 for i in range(streams)]
        await asyncio.sleep(warmup)
        long_text = FILLER * max(1, prompt_tokens // 15) + "\nSummarise the text above in one word."
        t_send = time.perf_counter()
        first = await stream_times(client, url, body(long_text, 1, 99))
        t_first = first[0] if first else time.perf_counter()
        times = await asyncio.gather(*tasks)
    before, during = [], []
    for ts in times:
        for a, b in zip(ts, ts[1:]):
            if b < t_send:
                before.append(b - a)
            elif b <= t_first:
                during.append(b - a)
    p50 = pct(before, 50)
    r4 = lambda x: round(x, 4) if x == x else None  # noqa: E731  NaN (no samples) -> null
    return {"streams": streams, "prompt_tokens_approx": prompt_tokens, "long_prompt_ttft_s": r4(t_first - t_send),
            "gap_p50_before_s": r4(p50), "gap_p50_during_s": r4(pct(during, 50)),
            "gap_p99_during_s": r4(pct(during, 99)), "gap_max_during_s": r4(max(during)) if during else None,
            "p99_during_over_p50_before": r4(pct(during, 99) / p50) if before and during else None,
            "gaps_before": len(before), "gaps_during": len(during),
            "streams_still_running_at_first_token": sum(1 for ts in times if ts and ts[-1] > t_first)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="drive the server at this base URL instead of starting one")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--streams", type=int, default=7)
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--prefill-chunk", type=int, help="`hetero serve --prefill-chunk` when this script starts it")
    ap.add_argument("--prefill-stall", type=float, help="`hetero serve --prefill-stall` when this script starts it")
    ap.add_argument("--warmup", type=float, default=4.0, help="seconds the streams decode before the long prompt")
    ap.add_argument("--max-tokens", type=int, default=400, help="each stream's length (it must outlast the prefill)")
    ap.add_argument("--json", dest="json_out")
    a = ap.parse_args()
    server, url = None, a.url.rstrip("/") if a.url else None
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [str(Path(sys.executable).with_name("hetero")), "serve", a.model, "--port", str(port),
               "--max-concurrency", str(a.streams + 1)]
        if a.prefill_chunk:
            cmd += ["--prefill-chunk", str(a.prefill_chunk)]
        if a.prefill_stall is not None:
            cmd += ["--prefill-stall", str(a.prefill_stall)]
        server = subprocess.Popen(cmd, env=os.environ.copy())
    try:
        wait_up(url, server)
        res = asyncio.run(run(url, a.model, a.streams, a.prompt_tokens, a.warmup, a.max_tokens))
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    res = {"url": url, "model": a.model, "prefill_chunk": a.prefill_chunk, "prefill_stall": a.prefill_stall, **res}
    print(json.dumps(res, indent=1))
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
