"""Predicted vs measured before and after calibration, over a grid of configurations, and the sweep.

    HETERO_CACHE=~/.cache/hetero-bench-t1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/calibration.py

Round A measures every configuration of GRID (each in a fresh process) under the profile with no
calibration, fits the cost model's multipliers to A's per-unit timings (hetero.bench.calibrate) and
stores them in the cached Profile. Round B measures every configuration again, in fresh processes,
planned with the calibrated profile: "after" errors are B's measurements against the calibrated
predictions, "before" errors the same measurements against the uncalibrated ones, so the fit is
judged on measurements it never saw. Then the sweep: one model under one cpu budget, every grid point
the cost model says fits, beside the planner's pick.

Writes benchmarks/out/calibration.json (raw runs, after every run) and prints markdown tables.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

OUT = Path(__file__).parent / "out" / "calibration.json"

S, L = "smollm2-135m", "synthetic:llama-1b"
# (model, precision, residency, context): both models, 4 precisions, resident and disk, context 128 and 1024
GRID = [
    (S, "fp32", "resident", 128), (S, "bf16", "resident", 128), (S, "int8", "resident", 128),
    (S, "int4", "resident", 128), (S, "bf16", "resident", 1024), (S, "int4", "resident", 1024),
    (S, "int8", "disk", 128), (S, "int4", "disk", 1024),
    (L, "fp32", "resident", 128), (L, "bf16", "resident", 128), (L, "int8", "resident", 128),
    (L, "int4", "resident", 128), (L, "int8", "resident", 1024), (L, "int4", "disk", 128),
]


def configs(prompt: int, new: int, repeats: int):
    from hetero.bench.run import Config

    return [Config(m, p, r, c, prompt, new if m == S else max(8, new * 3 // 4), repeats) for m, p, r, c in GRID]


def run_round(name: str, cfgs, state: dict) -> list[dict]:
    from hetero.bench.run import run_in_subprocess
    from hetero.errors import HeteroError

    runs = []
    for i, cfg in enumerate(cfgs):
        t = time.perf_counter()
        try:
            r = run_in_subprocess(cfg, timeout=900)
        except HeteroError as e:
            print(f"  [{name} {i + 1}/{len(cfgs)}] {cfg.label}: FAILED {e}", file=sys.stderr, flush=True)
            continue
        runs.append(r)
        me = r["result"]["measured"]
        print(f"  [{name} {i + 1}/{len(cfgs)}] {cfg.label}: decode {me['decode_tok_s']:.2f} tok/s, prefill "
              f"{me['prefill_tok_s']:.1f} tok/s ({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
        state[name] = runs
        save(state)
    return runs


def save(state: dict) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(OUT)


def pct(x) -> str:
    return "—" if x is None else f"{x * 100:+.1f}%"


def fp_rows(runs: list[dict]) -> list[tuple]:
    out = []
    for r in runs:
        res = r["result"]
        pred = res["predicted"]["footprint_bytes"].get("cpu", 0)
        whole = res["measured"]["footprint_bytes"].get("cpu", 0)
        run = res["measured"].get("footprint_run_bytes", {}).get("cpu", 0)
        out.append((r, pred, whole, run, (pred - whole) / whole if whole else None, (pred - run) / run if run else None))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sweep-model", default=S)
    ap.add_argument("--sweep-budget", default="cpu=200%")  # the whole process, tokenizer included
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--sweep-precisions", default="fp32,bf16,int8,int4")
    ap.add_argument("--refit", action="store_true", help="reuse round A from the JSON file, fit, then round B")
    ap.add_argument("--loo", action="store_true", help="also leave-one-out fits on round A (one fit per run)")
    ap.add_argument("--sweep-only", action="store_true", help="reuse rounds A and B from the JSON file, run the sweep")
    ap.add_argument("--interleaved", action="store_true",
                    help="measure each configuration twice back to back; fit on the first runs, judge on the second")
    ap.add_argument("--round-c", action="store_true",
                    help="reuse rounds A and B from the JSON file, fit on both, judge on a new round C")
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    import torch

    from hetero.bench.calibrate import Pricer, error_summary, fit, store
    from hetero.bench.run import Config
    from hetero.hardware import machine
    from hetero.hardware.profile import save as save_profile

    hw, prof = machine("this")
    uncal = dataclasses.replace(prof, calibration={})
    reuse = (a.refit or a.sweep_only or a.round_c) and OUT.exists()
    state = json.loads(OUT.read_text()) if reuse else {}
    t0 = time.perf_counter()
    judged, fitted_on = "B", "A"
    if a.sweep_only:
        A, B, before, after = state["A"], state["B"], state["B_before"], state["B_after"]
        fit_after, fit_loo = state["fit"]["after"], state["fit"]["leave_one_out"]
    elif a.round_c:
        # two rounds make the fit robust to one disturbed run; a third round, unseen, judges it
        A = state["A"] + state["B"]
        judged, fitted_on = "C", "A+B"
        f = fit(A, hw, uncal)
        store(f, uncal)
        state["fit_AB"] = f.to_dict()
        save(state)
        print(f"fit (A+B): {json.dumps({k: round(v, 3) for k, v in f.calibration.items()})}", file=sys.stderr)
        B = run_round("C", configs(a.prompt_tokens, a.new_tokens, a.repeats), state)
        before = [Pricer(r, hw).errors(uncal) for r in B]
        after = [Pricer(r, hw).errors(dataclasses.replace(prof, calibration=f.calibration)) for r in B]
        state["C_before"], state["C_after"] = before, after
        save(state)
        fit_after, fit_loo = f.after, f.loo
    else:
        save_profile(uncal)  # round A is planned without calibration
        state.update({"threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M"),
                      "profile_measured_at": prof.measured_at})
        cfgs = configs(a.prompt_tokens, a.new_tokens, a.repeats)
        if a.interleaved:
            # each configuration measured twice back to back (fresh processes): the fit sees the first,
            # the judge the second, so the machine's drift over minutes is not charged to the model
            pairs = [run_round(f"pair {i + 1}", [c, c], {}) for i, c in enumerate(cfgs)]
            pairs = [r for r in pairs if len(r) == 2]
            state["A"], state["B_measured"] = [r[0] for r in pairs], [r[1] for r in pairs]
            save(state)
        A = state.get("A") if (a.refit or a.interleaved) and state.get("A") else run_round("A", cfgs, state)
        f = fit(A, hw, uncal, leave_one_out=a.loo)
        store(f, uncal)
        state["fit"] = f.to_dict()
        save(state)
        print(f"fit: {json.dumps({k: round(v, 3) for k, v in f.calibration.items()})}", file=sys.stderr)
        B = state["B_measured"] if a.interleaved else run_round("B", cfgs, state)
        state["B"] = B
        before = [Pricer(r, hw).errors(uncal) for r in B]
        after = [Pricer(r, hw).errors(dataclasses.replace(prof, calibration=f.calibration)) for r in B]
        state["B_before"], state["B_after"] = before, after
        save(state)
        fit_after, fit_loo = f.after, f.loo

    print(f"\n### Calibration: {len(B)} configurations, {state['threads']} thread(s), {a.repeats} repeats each, "
          f"prompt {a.prompt_tokens}, decode steps timed at the end of the context\n")
    print("| configuration | measured decode tok/s (min–max) | before | after | measured prefill tok/s (min–max) | before | after |")
    print("|---|---|---|---|---|---|---|")
    for r, b, c in zip(B, before, after):
        me = r["result"]["measured"]
        rd, rp = me["ranges"]["decode_tok_s"], me["ranges"]["prefill_tok_s"]
        print(f"| {b['config']} | {me['decode_tok_s']:.2f} ({rd[0]:.2f}–{rd[1]:.2f}) | {pct(b['decode_error'])} | "
              f"{pct(c['decode_error'])} | {me['prefill_tok_s']:.1f} ({rp[0]:.1f}–{rp[1]:.1f}) | "
              f"{pct(b['prefill_error'])} | {pct(c['prefill_error'])} |")
    print("\n| errors (abs) | decode median | decode worst | prefill median | prefill worst |\n|---|---|---|---|---|")
    for name, rows in ((f"before (round {judged}, uncalibrated)", before),
                       (f"after (round {judged}, calibrated on {fitted_on})", after),
                       (f"in-sample (round {fitted_on})", fit_after), (f"leave-one-out (round {fitted_on})", fit_loo)):
        if not rows:
            continue
        s = error_summary(rows)
        print(f"| {name} | {pct(s['decode_error']['median_abs'])} | {pct(s['decode_error']['max_abs'])} | "
              f"{pct(s['prefill_error']['median_abs'])} | {pct(s['prefill_error']['max_abs'])} |")
    if A and B and len(A) == len(B):
        m = lambda r, k: r["result"]["measured"][k]
        for k in ("decode_tok_s", "prefill_tok_s"):
            e = [abs(m(x, k) / m(y, k) - 1) for x, y in zip(A, B)]
            print(f"| noise floor: {fitted_on}'s own {k} as the prediction of {judged} | "
                  f"{pct(statistics.median(e))} | {pct(max(e))} | | |")
    print("\n| configuration | predicted footprint | measured peak, whole process | error | measured peak, running | error |")
    print("|---|---|---|---|---|---|")
    fps = fp_rows(B)
    for r, pred, whole, run, e1, e2 in fps:
        print(f"| {Config(**r['config']).label} | {pred / 1e6:.0f} MB | {whole / 1e6:.0f} MB | {pct(e1)} | "
              f"{run / 1e6:.0f} MB | {pct(e2)} |")
    e1s = [abs(x[4]) for x in fps if x[4] is not None]
    e2s = [abs(x[5]) for x in fps if x[5] is not None]
    if e1s:
        print(f"\nfootprint |error| median: whole {statistics.median(e1s) * 100:.1f}% (worst {max(e1s) * 100:.1f}%), "
              f"running {statistics.median(e2s) * 100:.1f}% (worst {max(e2s) * 100:.1f}%)")
    if not a.skip_sweep:
        from hetero.bench.sweep import sweep

        sw = sweep(a.sweep_model, a.sweep_budget, a.sweep_precisions.split(","), ["resident", "disk"], [128],
                   a.prompt_tokens, a.new_tokens, a.repeats, progress=False)
        state["sweep"] = sw
        save(state)
        print(f"\n### Sweep: {a.sweep_model} under {a.sweep_budget} ({sw['budget_bytes'] / 1e6:.0f} MB)\n")
        print("| context | planner's pick | pick decode tok/s | best measured | best decode tok/s | pick / best | within 5% |")
        print("|---|---|---|---|---|---|---|")
        for row in sw["contexts"]:
            print(f"| {row['context']} | {row['pick']} | {row['pick_decode_tok_s']:.2f} | {row['best']} | "
                  f"{row['best_decode_tok_s']:.2f} | {row['pick_vs_best']:.3f} | {row['within_5pct']} |")
            for x in row["runs"]:
                print(f"|  | {x['config']} | {x['measured_decode_tok_s']:.2f} | footprint {x['footprint'] / 1e6:.0f} MB "
                      f"| error {pct(x['decode_error'])} | | |")
            for x in row["skipped"]:
                print(f"|  | {x['config']} | skipped: {x['why']} | | | | |")
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
