"""The KV pool under a load it cannot hold at once: every request queues for blocks and completes, and
the server's footprint stays within the plan's budget, measured from outside the server process.

    .venv/bin/python benchmarks/kv_pool_footprint.py --model smollm2-135m --memory cpu=1GB --context 2048

Starts `hetero serve MODEL --memory M --context C --max-concurrency N` on a loopback port, then sends
--clients streaming requests at once, each reserving a whole context (a long prompt, max_tokens up to
the context) and ended early by a stop string, so together they ask for more blocks than the pool has
and wait in turn. Meanwhile it samples the server's footprint as a memory limit sees it, on its own:
VmRSS of the process (/proc/PID/status) plus the page-cache bytes of every model file the process
has open or mapped (mincore on each file, runtime.memory.cached_bytes). Prints JSON: the budget, the
peak footprint and its ratio, the pool's size and its resident bytes (/metrics), the most requests seen
waiting, and the failed ones.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import free_port, wait_up  # noqa: E402

from hetero.plan.units import parse_bytes  # noqa: E402
from hetero.runtime.memory import cached_bytes  # noqa: E402

WEIGHT_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".npy")
FILLER = "The quick brown fox jumps over the lazy dog near the quiet river bank. "  # ~15 tokens


def model_files(pid: int) -> set[str]:
    """Weight files the process has mapped or open."""
    out = set()
    try:
        with open(f"/proc/{pid}/maps") as f:
            out |= {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                pass
    except OSError:
        pass
    return {p for p in out if p.endswith(WEIGHT_SUFFIXES) and os.path.isfile(p)}


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def metric(url: str, name: str) -> float | None:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


async def load(url: str, model: str, clients: int, prompt_tokens: int, max_tokens: int) -> list[str | None]:
    async def one(client: httpx.AsyncClient, i: int) -> str | None:
        body = {"model": model, "messages": [{"role": "user", "content": f"{i}. " + FILLER * (prompt_tokens // 15)}],
                "max_tokens": max_tokens, "temperature": 0.7, "seed": i, "stream": True, "stop": ["."]}
        try:
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    return f"HTTP {r.status_code}"
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and '"error"' in line:
                        return line[:200]
            return None
        except httpx.HTTPError as e:
            return f"{type(e).__name__}: {e}"

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=900, limits=limits) as client:
        return await asyncio.gather(*[one(client, i) for i in range(clients)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--memory", default="cpu=1GB", help="`hetero serve --memory`: the budget the footprint is held to")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--max-concurrency", type=int, default=16)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=300)
    ap.add_argument("--json", dest="json_out")
    a = ap.parse_args()
    budget = parse_bytes(a.memory.split("=", 1)[1]) if "=" in a.memory else parse_bytes(a.memory)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(Path(sys.executable).with_name("hetero")), "serve", a.model, "--port", str(port), "--memory", a.memory,
           "--context", str(a.context), "--max-concurrency", str(a.max_concurrency)]
    server = subprocess.Popen(cmd, env=os.environ.copy())
    peak, waiting, files, done = [0, 0, 0], [0.0], set(), threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                files.update(model_files(server.pid))
                r = rss(server.pid)
                c = sum(cached_bytes(p) for p in files)
                if r + c > peak[0]:
                    peak[:] = [r + c, r, c]
                waiting[0] = max(waiting[0], metric(url, "hetero_generations_waiting") or 0.0)
            except (OSError, httpx.HTTPError):
                pass
            time.sleep(0.05)

    try:
        wait_up(url, server)
        pool = metric(url, "hetero_kv_blocks_total") * metric(url, "hetero_kv_block_tokens")
        t = threading.Thread(target=sample, daemon=True)
        t.start()
        t0 = time.perf_counter()
        errors = asyncio.run(load(url, a.model, a.clients, a.prompt_tokens, a.context - a.prompt_tokens - 64))
        wall = time.perf_counter() - t0
        resident = metric(url, "hetero_kv_resident_bytes")
        done.set()
        t.join(5)
    finally:
        done.set()
        server.terminate()
        server.wait(30)
    res = {"model": a.model, "budget_bytes": budget, "context": a.context, "clients": a.clients,
           "pool_tokens": pool, "tokens_asked_at_once": a.clients * a.context,
           "peak_footprint_bytes": peak[0], "peak_rss_bytes": peak[1], "peak_page_cache_bytes": peak[2],
           "peak_over_budget": round(peak[0] / budget, 4), "kv_resident_bytes_at_end": resident,
           "most_waiting": waiting[0], "failed": sum(e is not None for e in errors),
           "errors": [e for e in errors if e][:3], "files": sorted(files), "wall_s": round(wall, 1)}
    print(json.dumps(res, indent=1))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
