"""Pipelined throughput on this machine: 2 ranks (1 thread each) vs 1 rank, against the cost model.

    .venv/bin/python benchmarks/pipeline.py [--model smollm2-135m] [--sequences 8] [-n 32] [--repeats 2] [--two-threads]

Side by side, interleaved (the machine is shared and noisy), each round\nstarting with a one-process run that calibrates the cost model: 1 rank x 1 thread, 2 ranks x 1 thread,
(and with --two-threads 1 rank x 2 threads), each generating `-n` tokens for `--sequences` sequences in flight (micro-batches
of 1). The prediction is the cost model's (hetero.dist.split) with this machine's profile measured at
one thread (what each rank gets) and the loopback link measured by a gloo ping-pong — once as measured
("uncalibrated") and once after the closed loop: the model run by `hetero bench` in one-thread
processes — one alone for the 1-rank case, two at once for 2 ranks sharing this host — and the cost
model's multipliers fitted to their per-unit timings (hetero.bench.calibrate). It also prints
the what-if for synthetic:llama-7b over 2-4 catalog hosts on 10 GbE and 100 GbE.
Writes out/pipeline.json; paste the printed markdown into docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _pingpong(rank: int, port: int, q) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    t = torch.zeros(576)  # one token's hidden state of SmolLM2, fp32
    times = []
    for i in range(300):
        t0 = time.perf_counter()
        if rank == 0:
            dist.send(t, 1)
            dist.recv(t, 1)
        else:
            dist.recv(t, 0)
            dist.send(t, 0)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        q.put(statistics.median(times[50:]) / 2)  # one way
    dist.destroy_process_group()


def loopback_latency() -> float:
    import torch.multiprocessing as mp

    from hetero.dist.launch import free_port

    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    port = free_port()
    ps = [ctx.Process(target=_pingpong, args=(r, port, q)) for r in range(2)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(120)
    return q.get()


def one_thread_profile():
    """This machine's profile measured at one thread (a rank's share), in a private cache dir."""
    import torch

    os.environ["HETERO_CACHE"] = tempfile.mkdtemp(prefix="hetero-bench-")
    torch.set_num_threads(1)
    from hetero.hardware.inventory import inventory
    from hetero.hardware.profile import get_profile

    return inventory(), get_profile(quick=True, progress=False)


def one_process_run(model: str, prompt: int, new: int) -> dict:
    """`hetero bench`'s measurement of `model` fp32 in one fresh process at one thread (per-unit timings)."""
    from hetero.bench.run import Config, run_in_subprocess

    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        return run_in_subprocess(Config(model, "fp32", "resident", prompt + new, prompt, new, 3), timeout=900)
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old


def concurrent_runs(model: str, prompt: int, new: int, n: int) -> list[dict]:
    """`n` one-process runs at once: what one rank measures while n - 1 others share its host (the
    memory system, the last-level cache, the scheduler). A pipeline of n local ranks is predicted
    from these, not from a run that had the machine to itself."""
    if n == 1:
        return [one_process_run(model, prompt, new)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(n) as ex:
        return list(ex.map(lambda _: one_process_run(model, prompt, new), range(n)))


def calibrated(hw, prof, runs: list[dict]):
    """The closed loop: the cost model's multipliers fitted to one-process runs (hetero.bench.calibrate).
    The pipeline runs are never part of the fit: 2 ranks are predicted from one process's timings."""
    from hetero.bench.calibrate import Pricer, fit

    f = fit(runs, hw, prof)
    cal = dataclasses.replace(prof, calibration=f.calibration)
    dec = [r["result"]["measured"]["decode_tok_s"] for r in runs]
    err = [Pricer(r, hw).errors(cal)["decode_error"] for r in runs]
    print(f"calibration runs: decode {statistics.median(dec):.2f} tok/s [{min(dec):.2f}..{max(dec):.2f}]; "
          f"calibrated errors {', '.join(f'{e:+.1%}' for e in err)}; "
          f"fit {json.dumps({k: round(v, 3) for k, v in f.calibration.items()})}", file=sys.stderr)
    return cal, {"one_process_decode_tok_s": dec, "calibration": f.calibration}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("-n", "--max-new-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="out/pipeline.json")
    ap.add_argument("--two-threads", action="store_true", help="also 1 rank x 2 threads (slow when the cores are oversubscribed)")
    a = ap.parse_args()

    from hetero.dist.hosts import Hosts, LinkInfo, catalog_hosts, local_hosts
    from hetero.dist.launch import spawn_local
    from hetero.dist.pipeline import Job
    from hetero.dist.split import rank_speeds, split_model
    from hetero.model.sources import resolve_spec

    spec = resolve_spec(a.model)
    lat = loopback_latency()
    print(f"gloo loopback one-way latency (576 floats): {lat * 1e6:.0f} µs", file=sys.stderr)
    hw, prof = one_thread_profile()

    def hosts(ranks: int) -> Hosts:
        h = local_hosts(ranks)
        return Hosts(h.hosts, local_link=LinkInfo(5e9, lat, "loopback"))

    prompts = [[(7 * i + j) % 1000 + 10 for j in range(a.prompt_tokens)] for i in range(a.sequences)]
    job = dict(prompts=prompts, max_new_tokens=a.max_new_tokens, ignore_stop=True, precisions=["fp32"])  # as predicted
    cases = {"1 rank x 1 thread": (1, 1), "2 ranks x 1 thread": (2, 1)}
    if a.two_threads:
        cases["1 rank x 2 threads"] = (1, 2)
    runs: dict[str, list[dict]] = {k: [] for k in cases}
    sharing = sorted({ranks for ranks, _ in cases.values()})  # processes per host in each case
    one_process: dict[int, list[dict]] = {n: [] for n in sharing}
    for rep in range(a.repeats):
        for n in sharing:
            rs = concurrent_runs(a.model, a.prompt_tokens, a.max_new_tokens, n)
            one_process[n] += rs
            print(f"[{rep}] calibration, {n} one-thread process(es) at once: decode "
                  f"{', '.join('%.2f' % r['result']['measured']['decode_tok_s'] for r in rs)} tok/s", file=sys.stderr)
        for name, (ranks, threads) in cases.items():
            r = spawn_local(a.model, hosts(ranks), Job(**job), timeout=120, threads=threads, max_s=900)
            runs[name].append(r)
            print(f"[{rep}] {name}: decode {r['decode_tok_s']:.2f} tok/s, overall {r['tok_s']:.2f} tok/s",
                  file=sys.stderr)
    ctx = a.prompt_tokens + a.max_new_tokens
    cal_of, cal_info = {}, {}
    for n in sharing:
        cal_of[n], cal_info[f"{n} at once"] = calibrated(hw, prof, one_process[n])
    pred = {}
    for name, (ranks, threads) in cases.items():
        if threads != 1:
            continue  # the profile was measured at one thread
        h = hosts(ranks)
        for key, p in (("uncalibrated", prof), ("calibrated", cal_of[ranks])):
            s = split_model(spec, h, rank_speeds(h, (hw, p), per_rank_profile=True), "fp32", 1, a.sequences,
                            a.prompt_tokens, ctx)
            pred.setdefault(name, {})[key] = {**s.predict(), "layers": s.layer_counts()}
    table = []
    for name, rs in runs.items():
        dec = [r["decode_tok_s"] for r in rs]
        row = {"case": name, "decode_tok_s_median": statistics.median(dec), "min": min(dec), "max": max(dec),
               "layers": [x["layers"] for x in rs[0]["ranks"]],
               "weight_mb": [round(x["weight_bytes"] / 1e6, 1) for x in rs[0]["ranks"]],
               "rss_mb": [round(x["rss_after_load"] / 1e6) for x in rs[0]["ranks"]],
               "heap_growth_mb": [round(x["anon_load_delta"] / 1e6) for x in rs[0]["ranks"]],
               "busy": [round(x["compute_s"] / rs[0]["wall_s"], 2) for x in rs[0]["ranks"]]}
        if name in pred:
            row["predicted_uncalibrated_tok_s"] = pred[name]["uncalibrated"]["throughput_tok_s"]
            row["predicted_tok_s"] = pred[name]["calibrated"]["throughput_tok_s"]
            row["measured_over_predicted"] = row["decode_tok_s_median"] / row["predicted_tok_s"]
        table.append(row)
    what_if = []
    s7 = resolve_spec("synthetic:llama-7b")
    for hw in ("desktop", "rtx4090"):
        for n in (2, 3, 4):
            for ln in ("10gbe", "100gbe"):
                h = catalog_hosts([hw] * n, ln)
                s = split_model(s7, h, rank_speeds(h), "bf16", 1, n, 512, 1024)
                what_if.append({"hosts": f"{n} x {hw}", "link": ln, "layers": s.layer_counts(), **s.predict()})
    out = {"model": a.model, "sequences": a.sequences, "max_new_tokens": a.max_new_tokens,
           "loopback_latency_s": lat, "calibration": cal_info, "runs": table, "what_if": what_if,
           "full_weight_mb": round(runs["1 rank x 1 thread"][0]["full_weight_bytes"] / 1e6, 1)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(a.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, a.out)
    print("| case | layers per rank | decode tok/s median [min..max] | predicted, uncalibrated | predicted, calibrated | measured/predicted | weights MB per rank | RSS MB per rank | busy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table:
        p = f"{r['predicted_tok_s']:.2f}" if "predicted_tok_s" in r else "—"
        pu = f"{r['predicted_uncalibrated_tok_s']:.2f}" if "predicted_tok_s" in r else "—"
        mp = f"{r['measured_over_predicted']:.2f}" if "measured_over_predicted" in r else "—"
        print(f"| {r['case']} | {r['layers']} | {r['decode_tok_s_median']:.2f} [{r['min']:.2f}..{r['max']:.2f}] "
              f"| {pu} | {p} | {mp} | {r['weight_mb']} | {r['rss_mb']} | {r['busy']} |")
    print()
    print("| hosts | link | layers per stage | decode tok/s (1 seq) | throughput tok/s (1 micro-batch per stage) | prefill tok/s (512) |")
    print("|---|---|---|---|---|---|")
    for w in what_if:
        print(f"| {w['hosts']} | {w['link']} | {w['layers']} | {w['decode_tok_s']:.2f} | {w['throughput_tok_s']:.2f} "
              f"| {w['prefill_tok_s']:.0f} |")


if __name__ == "__main__":
    main()
