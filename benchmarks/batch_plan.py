"""Batch size as a plan decision, measured: a disk-streamed plan's decode throughput at B = 1, 8, 32,
predicted vs measured, and the planner's chosen B against the measured best.

    PYTHONPATH=src .venv/bin/python benchmarks/batch_plan.py [--model synthetic:llama-1b] [--memory cpu=25%]
        [--prompt-tokens 64] [--new-tokens 16] [--repeats 1] [--keep-rows] [--out FILE.json]

First the profile's row-kernel rates (the compute each row of a batched step costs, Profile gemm_rows)
are measured again, so they come from the same machine state as the run (--keep-rows: use the
cached ones). Then one `hetero bench MODEL --memory M --batch auto --json` process plans (the
planner picks B with the placement, the whole process inside the budget) and measures aggregate
decode tok/s at every size the plan found room for, on the chosen placement; each size's prediction
is that placement priced at that size. Printed: B = 1 (the single-sequence path, and the batch
runner's), 8, 32 and the chosen B, with the error of each prediction; the chosen B's measured rate
over the best measured one. Timing: run on a quiet machine (~2-3 minutes once the model's cache
files exist; the first run builds the synthetic weights and the plan's quantised files).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHOWN = (1, 8, 32)


def remeasure_rows() -> dict:
    """The row-kernel rates measured now, saved into the cached profile (the rest of it kept)."""
    from hetero.hardware.profile import get_profile, top_up_rows

    prof = top_up_rows(get_profile(progress=False), force=True)
    return {d: {p: round(m.median / 1e9, 2) for p, m in dp.gemm_rows.items()} for d, dp in prof.devices.items()}


def bench(model: str, memory: str, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    cmd = [sys.executable, "-m", "hetero.cli", "bench", model, "--memory", memory, "--batch", "auto",
           "--prompt-tokens", str(prompt_tokens), "--new-tokens", str(new_tokens), "--repeats", str(repeats), "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def table(res: dict) -> dict:
    """The Must-show rows and verdicts from one `hetero bench --batch auto --json` result."""
    rows = res["batches"]
    chosen = res["chosen_batch"]
    batched = {r["batch"]: r for r in rows if r["path"] == "batched"}
    single = next((r for r in rows if r["path"] == "single"), None)
    best = max(batched.values(), key=lambda r: r["decode_tok_s"])
    shown = []
    if single is not None:
        shown.append({**single, "label": "1 (single path)"})
    for b in sorted(set(SHOWN) | {chosen}):
        if b in batched:
            shown.append({**batched[b], "label": f"{b}{' (chosen)' if b == chosen else ''}"})
    errors = [abs(r["error"]) for r in shown if r.get("error") is not None and r["batch"] in SHOWN]
    mine = batched[chosen]["decode_tok_s"] if chosen in batched else 0.0
    options = res["plan"]["workload"].get("batch_options", [])
    return {"rows": shown, "chosen_batch": chosen, "best_batch": best["batch"],
            "best_decode_tok_s": best["decode_tok_s"], "chosen_vs_best": round(mine / best["decode_tok_s"], 4),
            "max_abs_error": round(max(errors), 4) if errors else None,
            "within_25pct": bool(errors) and max(errors) <= 0.25, "chosen_within_10pct": mine >= 0.9 * best["decode_tok_s"],
            "planner_options": options}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="synthetic:llama-1b")
    ap.add_argument("--memory", default="cpu=25%")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--keep-rows", action="store_true", help="use the cached row-kernel rates as they are")
    ap.add_argument("--out", help="write the result JSON here")
    a = ap.parse_args()
    t0 = time.time()
    rates = None if a.keep_rows else remeasure_rows()
    res = bench(a.model, a.memory, a.prompt_tokens, a.new_tokens, a.repeats)
    t = table(res)
    print(f"{a.model} at --memory {a.memory} (P={a.prompt_tokens}, N={a.new_tokens}, repeats {a.repeats}); "
          f"units on disk: {sum(u['residency'] == 'disk' for u in res['plan']['units'])} of {len(res['plan']['units'])}")
    if rates:
        print("row-kernel rates (GFLOP/s at 32 rows): " + ", ".join(f"{d} {p} {v}" for d, r in rates.items()
                                                                   for p, v in r.items()))
    print(f"{'batch':<18}{'measured tok/s':>16}{'predicted':>12}{'error':>9}")
    for r in t["rows"]:
        err = "—" if r.get("error") is None else f"{r['error'] * 100:+.0f}%"
        print(f"{r['label']:<18}{r['decode_tok_s']:>16.2f}{r['predicted_decode_tok_s']:>12.2f}{err:>9}")
    print("planner: " + ", ".join(f"B={o['batch']} {o['decode_tok_s']:.1f}" if o["fits"] else f"B={o['batch']} no fit"
                                  for o in t["planner_options"]) + f" -> chosen B={t['chosen_batch']}")
    print(f"measured best: B={t['best_batch']} {t['best_decode_tok_s']:.2f} tok/s; chosen/best "
          f"{t['chosen_vs_best']:.2f} ({'within' if t['chosen_within_10pct'] else 'NOT within'} 10%); "
          f"worst |error| at B=1,8,32 {t['max_abs_error'] * 100:.0f}% "
          f"({'within' if t['within_25pct'] else 'NOT within'} 25%)  [{time.time() - t0:.0f} s]")
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "row_rates_gflops": rates, **t, "bench": res}, indent=1))


if __name__ == "__main__":
    main()
