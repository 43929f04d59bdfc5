"""Checks the hardware profile against itself and against independent tools.

1. Stability: `hetero profile --quick --refresh` N times; the medians of memory bandwidth and bf16 GEMM
   should stay within ±10% of their mean.
2. Agreement (side by side, one run): hetero's memory copy bandwidth vs a numpy copy loop, and
   hetero's O_DIRECT disk read vs `dd iflag=direct` on the same file; within ±15%.

    python benchmarks/hardware_check.py [--runs 3] [--skip-stability]

Prints a markdown report; exit code 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HETERO = [sys.executable, "-m", "hetero.cli"]


def spread(xs: list[float]) -> float:
    """Largest relative deviation from the mean."""
    m = statistics.fmean(xs)
    return max(abs(x - m) / m for x in xs)


def stability(runs: int) -> tuple[list[str], bool]:
    mem, bf16, secs = [], [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = subprocess.run([*HETERO, "profile", "--quick", "--refresh", "--json"], check=True,
                             capture_output=True, text=True).stdout
        secs.append(time.perf_counter() - t0)
        cpu = json.loads(out)["devices"]["cpu"]
        mem.append(cpu["mem_bandwidth"]["median"])
        bf16.append(cpu["gemm_flops"]["bf16"]["median"])
    ok = spread(mem) <= 0.10 and spread(bf16) <= 0.10
    lines = [f"| run | memory copy GB/s | bf16 GEMM GFLOP/s | wall s |", "|---|---|---|---|"]
    lines += [f"| {i + 1} | {m / 1e9:.2f} | {g / 1e9:.1f} | {s:.1f} |"
              for i, (m, g, s) in enumerate(zip(mem, bf16, secs))]
    lines.append(f"| max deviation from mean | {spread(mem):.1%} | {spread(bf16):.1%} | "
                 f"{'PASS' if ok else 'FAIL'} (±10%) |")
    return lines, ok


def numpy_copy(nbytes: int, repeats: int) -> float:
    """Median copy rate of np.copyto over two large buffers, read + write bytes counted."""
    src = np.random.default_rng(0).random(nbytes // 8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        rates.append(2 * src.nbytes / (time.perf_counter() - t0))
    return statistics.median(rates)


def dd_direct(path: Path, chunk: int, repeats: int) -> float:
    """Median rate of `dd iflag=direct` reading the whole file."""
    size = path.stat().st_size
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = subprocess.run(["dd", f"if={path}", "of=/dev/null", f"bs={chunk}", "iflag=direct"],
                           capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t0
        m = re.search(r"copied, ([\d.,]+) s", r.stderr)  # dd's own timing, without process start
        rates.append(size / (float(m.group(1).replace(",", ".")) if m else wall))
    return statistics.median(rates)


def agreement() -> tuple[list[str], bool]:
    import torch

    from hetero.hardware import bench, diskbench

    sz = bench.QUICK
    with torch.inference_mode():
        copy, _ = bench.mem_bandwidth(bench.Backend("cpu"), sz)
    npc = numpy_copy(sz.copy_bytes, 11)
    path = diskbench.probe_file(sz.disk_bytes)
    direct, method = diskbench.read_direct(path, sz)
    rows = [("memory copy (read+write)", copy.median, "numpy copyto loop", npc)]
    if shutil.which("dd") and method == "O_DIRECT":
        rows.append((f"disk read ({method}, {sz.disk_chunk >> 20} MiB reads)", direct.median,
                     f"dd bs={sz.disk_chunk >> 20}M iflag=direct", dd_direct(path, sz.disk_chunk, 5)))
    lines = ["| figure | hetero GB/s | independent tool | tool GB/s | hetero / tool | within ±15% |",
             "|---|---|---|---|---|---|"]
    ok = True
    for name, ours, tool, theirs in rows:
        r = ours / theirs
        good = abs(r - 1) <= 0.15
        ok &= good
        lines.append(f"| {name} | {ours / 1e9:.2f} | {tool} | {theirs / 1e9:.2f} | {r:.2f} | "
                     f"{'PASS' if good else 'FAIL'} |")
    return lines, ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-stability", action="store_true")
    a = ap.parse_args()
    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}\n")
    ok = True
    if not a.skip_stability:
        lines, good = stability(a.runs)
        ok &= good
        print(f"`hetero profile --quick --refresh` x{a.runs}:\n")
        print("\n".join(lines) + "\n")
    lines, good = agreement()
    ok &= good
    print("agreement with independent tools (side by side, one process):\n")
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
