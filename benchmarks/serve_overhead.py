"""What the serving path costs one client: the engine's own decode rate (Engine.stream, as `hetero run`
generates) against the rate one streaming client sees from `hetero serve` on the same loaded engine,
alternated round by round in one process, so a shared machine's drift hits both alike.

    .venv/bin/python benchmarks/serve_overhead.py --model smollm2-135m --rounds 6 --tokens 128

The server runs in this process (uvicorn on a thread, the scheduler's worker on another, as
`hetero serve` runs); the client is benchmarks/serve_load.py --url in a child process, so its
parsing does not share this process's interpreter lock. Both sides decode greedily from the same chat
prompt, so they make the same tokens. Prints JSON: per-round rates, the median of the per-round
ratios (served / direct) and the client's TTFT and inter-token p50.

With --replay the engine (or, batching, the batch runner's model) is replaced by one that replays
the tokens it made through the real detokeniser with no model compute: then everything the server process spends is the serving
path's, and its CPU time per token (this process: event loop, worker, detokenising, framing) is a
figure a busy machine barely moves, unlike wall-clock rates.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

PROMPT = [{"role": "user", "content": "Write a long story about a dragon who learns to cook, with many details."}]
HERE = Path(__file__).resolve().parent


def serve_in_thread(app):
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            sys.exit("the server did not start")
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}"


def direct_rate(engine, tokens: int) -> tuple[float, int]:
    recs = list(engine.stream(PROMPT, max_new_tokens=tokens, temperature=0.0, chat=True))
    return recs[-1].decode_tok_s, sum(len(r.token_ids) for r in recs)


def served(url: str, model: str, tokens: int, requests: int) -> dict:
    out = subprocess.run([sys.executable, str(HERE / "serve_load.py"), "--url", url, "--model", model,
                          "--clients", "1", "--requests", str(requests), "--max-tokens", str(tokens),
                          "--temperature", "0", "--prompt", PROMPT[0]["content"]],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


class Replay:
    """An engine that replays `ids` (Records as Engine.stream makes them) with no model compute."""

    def __init__(self, engine, ids: list[int], pace_s: float = 0.0):
        self.engine, self.ids, self.pace_s = engine, ids, pace_s
        self.plan, self.model = engine.plan, engine.model
        self.report, self.over_budget, self.footprint = engine.report, engine.over_budget, engine.footprint

    def stream(self, prompt, max_new_tokens: int = 128, **_):
        from hetero.runtime.generate import Record, _Detok

        detok = _Detok(self.model.tokenizer)
        for i in range(max_new_tokens):
            if self.pace_s:
                time.sleep(self.pace_s)  # a token's compute with the interpreter lock released
            tid = self.ids[i % len(self.ids)]
            yield Record(detok.add(tid), [tid], 1, i + 1, 0.0, 0.0, "length" if i + 1 == max_new_tokens else None)


class ReplayNet:
    """A batch runner's model that replays `ids` with no model compute: forward_ragged returns logits
    whose greedy pick is the next replayed id, one per wanted row (after `pace_s` slept)."""

    def __init__(self, net, ids: list[int], pace_s: float = 0.0):
        self.spec, self.ids, self.pace_s, self.i = net.spec, ids, pace_s, 0
        self.vocab = net.spec.vocab_size

    def chunks_as_rows(self, kv) -> bool:
        return False

    def forward_ragged(self, ids, r, kv, want=None, chunks_as_rows=False):
        import torch

        if self.pace_s:
            time.sleep(self.pace_s)
        n = len(r.segments) if want is None else want.numel()
        logits = torch.zeros(n, self.vocab)
        for row in range(n):
            logits[row, self.ids[self.i % len(self.ids)]] = 1.0
            self.i += 1
        return logits


def thread_cpu() -> dict[str, float]:
    """CPU seconds so far of each thread of this process, by Python thread name (others by id)."""
    import os

    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = names.get(int(tid), "other")
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def replay(engine, model: str, tokens: int, requests: int, rounds: int, pace_s: float) -> dict:
    from hetero.serve.app import create_app

    ids = [t for r in engine.stream(PROMPT, max_new_tokens=64, temperature=0.0, chat=True) for t in r.token_ids
           if t not in engine.model.tokenizer.stop_ids]
    app = create_app(Replay(engine, ids, pace_s), model_id=model)
    runner = getattr(app.state.scheduler, "runner", None)
    if runner is not None:  # continuous batching: the runner steps its model, not Engine.stream
        runner.model = ReplayNet(runner.model, ids, pace_s)
    server, thread, url = serve_in_thread(app)
    out = []
    try:
        served(url, model, 8, 1)  # warm
        for _ in range(rounds):
            c0, t0, th0 = time.process_time(), time.perf_counter(), thread_cpu()
            s = served(url, model, tokens, requests)
            cpu, wall, th1 = time.process_time() - c0, time.perf_counter() - t0, thread_cpu()
            n = s["completion_tokens"]
            if not n:
                sys.exit(f"serve_overhead: the served request returned no tokens: {s.get('errors')}")
            per_thread = {k: round((v - th0.get(k, 0.0)) / n * 1e6, 1) for k, v in th1.items()}
            out.append({"server_cpu_us_per_token": round(cpu / n * 1e6, 1), "tokens": n,
                        "by_thread_us_per_token": {k: v for k, v in per_thread.items() if v > 0},
                        "client_tok_s": s["aggregate_tok_s"], "wall_s": round(wall, 2)})
            print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    finally:
        server.should_exit = True
        thread.join(10)
    return {"model": model, "replay": True, "pace_s": pace_s, "rounds": out,
            "server_cpu_us_per_token_median": statistics.median(x["server_cpu_us_per_token"] for x in out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--requests", type=int, default=2, help="served requests a round")
    ap.add_argument("--replay", action="store_true", help="measure the serving path alone (see above)")
    ap.add_argument("--pace-ms", type=float, default=0.0,
                    help="with --replay: each token takes this long (slept), so the loop meets tokens one by one")
    ap.add_argument("--json", dest="json_out")
    a = ap.parse_args()

    from hetero.commands.serve import load_engine
    from hetero.serve.app import create_app

    engine, _ = load_engine(a.model, progress=False)
    if a.replay:
        res = replay(engine, a.model, a.tokens, a.requests, a.rounds, a.pace_ms / 1000)
        engine.close()
        print(json.dumps(res, indent=1))
        if a.json_out:
            Path(a.json_out).write_text(json.dumps(res, indent=1))
        return
    server, thread, url = serve_in_thread(create_app(engine, model_id=a.model))
    rounds = []
    try:
        # warm both sides at full length: the first long generation runs several times slower (first-call
        # allocations and set-up), which is nobody's per-token cost
        direct_rate(engine, a.tokens)
        served(url, a.model, a.tokens, 1)
        for r in range(a.rounds):
            d, n = direct_rate(engine, a.tokens)
            s = served(url, a.model, a.tokens, a.requests)
            rate = s["stream_decode_tok_s_p50"]
            rounds.append({"direct_tok_s": round(d, 2), "direct_tokens": n, "served_tok_s": rate,
                           "ratio": round(rate / d, 4) if rate and d else None, "ttft_p50_s": s["ttft_p50_s"],
                           "itl_p50_s": s["itl_p50_s"], "failed": s["failed"]})
            print(json.dumps(rounds[-1]), file=sys.stderr, flush=True)
    finally:
        server.should_exit = True
        thread.join(10)
        engine.close()
    ratios = [x["ratio"] for x in rounds if x["ratio"]]
    res = {"model": a.model, "plan_precisions": sorted({u.precision for u in engine.plan.units}),
           "tokens": a.tokens, "rounds": rounds,
           "ratio_median": round(statistics.median(ratios), 4) if ratios else None,
           "direct_tok_s_median": round(statistics.median(x["direct_tok_s"] for x in rounds), 2),
           "served_tok_s_median": round(statistics.median(x["served_tok_s"] or 0 for x in rounds), 2)}
    print(json.dumps(res, indent=1))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
