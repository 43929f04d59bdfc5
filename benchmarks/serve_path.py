"""What the serving path costs one client, as #18 states it: `hetero bench MODEL`'s decode rate against
the decode rate one streaming client of `hetero serve MODEL` sees, alternated bench, serve, bench,
serve in separate processes (each side alone on the machine, as a user runs them).

    .venv/bin/python benchmarks/serve_path.py --model smollm2-135m --rounds 2

The client is benchmarks/serve_load.py (one client, --duration seconds, --max-tokens a request,
greedy by default, as bench decodes); its per-request decode rate excludes the time to first token, as bench's
decode rate does; the aggregate rate (TTFT counted in) is printed beside it. Prints JSON: per
round bench decode tok/s, served stream decode p50, their ratio, and the medians.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def bench(model: str, prompt_tokens: int, new_tokens: int, repeats: int) -> float:
    hetero = str(Path(sys.executable).with_name("hetero"))
    r = subprocess.run([hetero, "bench", model, "--prompt-tokens", str(prompt_tokens), "--new-tokens", str(new_tokens),
                        "--repeats", str(repeats), "--json"], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"hetero bench failed ({r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
    return float(json.loads(r.stdout)["measured"]["decode_tok_s"])


def served(model: str, duration: float, max_tokens: int, temperature: float) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "load.json"
        r = subprocess.run([sys.executable, str(HERE / "serve_load.py"), "--model", model, "--clients", "1",
                            "--duration", str(duration), "--max-tokens", str(max_tokens), "--temperature", str(temperature),
                            "--json", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
        if r.returncode != 0 or not out.exists():
            sys.exit(f"serve_load.py failed ({r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=40, help="bench's prompt (about the load's chat prompt)")
    ap.add_argument("--new-tokens", type=int, default=64, help="bench's decode steps (the load's max tokens)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of one served client a round")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="the client's sampling (0: greedy, as bench decodes; 0.7 with top-p 0.95 adds the sampler)")
    a = ap.parse_args()
    if a.rounds < 1:
        sys.exit("--rounds must be ≥ 1")
    rounds = []
    for i in range(a.rounds):
        b = bench(a.model, a.prompt_tokens, a.new_tokens, a.repeats)
        s = served(a.model, a.duration, a.new_tokens, a.temperature)
        stream = s["stream_decode_tok_s_p50"]
        rounds.append({"bench_decode_tok_s": round(b, 2), "served_stream_decode_tok_s": stream,
                       "served_aggregate_tok_s": s["aggregate_tok_s"], "failed": s["failed"],
                       "ratio": round(stream / b, 4) if stream else None,
                       "aggregate_ratio": round(s["aggregate_tok_s"] / b, 4)})
        print(f"round {i + 1}: bench {b:.1f} tok/s, served stream {stream} tok/s", file=sys.stderr, flush=True)
    ratios = [r["ratio"] for r in rounds if r["ratio"] is not None]
    print(json.dumps({"model": a.model, "temperature": a.temperature, "rounds": rounds,
                      "ratio_median": round(statistics.median(ratios), 4) if ratios else None,
                      "aggregate_ratio_median": round(statistics.median(r["aggregate_ratio"] for r in rounds), 4)},
                     indent=1))


if __name__ == "__main__":
    main()
