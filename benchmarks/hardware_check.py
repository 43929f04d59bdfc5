"""Checks the hardware profile against itself and against independent tools.

1. Stability: `hetero profile --quick --refresh` N times; the medians of memory bandwidth and bf16 GEMM
   should stay within ±10% of their mean.
2. Agreement (side by side, strictly alternating): hetero's memory copy bandwidth vs a numpy copy
   loop, and hetero's O_DIRECT disk read vs `dd iflag=direct` on the same file; within ±15%.

    python benchmarks/hardware_check.py [--runs 3] [--pairs 24] [--skip-stability]

Prints a markdown report; exit code 1 when a check fails.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

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


class NumpyCopy:
    """A numpy copy loop over two large buffers, split over `threads` Python threads (numpy drops the
    GIL), read + written bytes counted like hetero's figure.

    kind "ufunc" copies with `np.positive(src, out=dst)`: numpy's own vector loads and stores, the
    instruction mix of STREAM Copy and of hetero's copy. kind "memcpy" is `np.copyto`, which hands
    the copy to the C library's memcpy; on this CPU that reaches only 70-85% of a vector loop on the
    same buffers (its large-copy strategy), so it is reported beside the check, not as the check.
    """

    def __init__(self, nbytes: int, threads: int, kind: str = "ufunc"):
        self.src = np.random.default_rng(0).random(nbytes // 8)
        self.dst = np.empty_like(self.src)
        self.op = (lambda s, d: np.positive(s, out=d)) if kind == "ufunc" else (lambda s, d: np.copyto(d, s))
        self.pool = ThreadPoolExecutor(threads) if threads > 1 else None
        step = -(-len(self.src) // threads)
        self.bounds = [(i, min(i + step, len(self.src))) for i in range(0, len(self.src), step)]
        self.once()

    def once(self) -> None:
        if self.pool is None:
            self.op(self.src, self.dst)
        else:
            list(self.pool.map(lambda ab: self.op(self.src[ab[0]:ab[1]], self.dst[ab[0]:ab[1]]), self.bounds))

    def rate(self, calls: int) -> float:
        """Bytes/s over one batch of `calls` copies."""
        t0 = time.perf_counter()
        for _ in range(calls):
            self.once()
        return calls * 2 * self.src.nbytes / (time.perf_counter() - t0)


def alternate(ours: Callable[[], float], theirs: Callable[[], float], pairs: int) -> tuple[list[float], list[float], list[float]]:
    """Strictly alternating samples, ours first and last: o t o t ... t o. Each `theirs` sample is
    compared with the mean of the two `ours` samples either side of it, so drift in the machine's
    speed (this VM's memory and disk rates move by 20-50% within a minute) cancels to first order,
    and each tool always runs right after the other (a read right after the same tool's read can hit
    a cache of the virtual disk's host that the other tool's requests would not)."""
    o, t = [ours()], []
    for _ in range(pairs):
        t.append(theirs())
        o.append(ours())
    ratios = [(o[i] + o[i + 1]) / 2 / t[i] for i in range(pairs)]
    return o, t, ratios


THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


class HugePagesForDd:
    """Sets the system's transparent huge pages to `always` while one dd runs, then back.

    hetero reads into huge pages (hetero.pagebuf); dd reads into a malloc'd buffer, which only gets
    huge pages when THP is `always`. An O_DIRECT request is cut at every break in the buffer's
    physical memory, so the two would otherwise time different request sizes (about 0.5 vs 4 MiB on
    this virtio disk), not different readers. Needs root; `usable` says whether this system allows it.
    """

    usable = THP.exists() and os.access(THP, os.W_OK)

    def __enter__(self):
        self.was = re.search(r"\[(\w+)\]", THP.read_text()).group(1)
        THP.write_text("always")

    def __exit__(self, *exc):
        THP.write_text(self.was)


def dd_direct(path: Path, chunk: int, huge: bool = False) -> float:
    """Rate of one `dd iflag=direct` pass over the whole file (dd's own timing). With `huge`, dd runs
    under HugePagesForDd and with bs = chunk - 8 KiB: dd adds a page of slack to its buffer and
    glibc a page for its header, so the mapping is exactly `chunk` bytes, which the kernel places on
    a huge-page boundary (the request sizes in the report show whether it worked)."""
    size = path.stat().st_size
    bs = chunk - 8192 if huge else chunk
    cmd = ["dd", f"if={path}", "of=/dev/null", f"bs={bs}", "iflag=direct"]
    t0 = time.perf_counter()
    with HugePagesForDd() if huge else contextlib.nullcontext():
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    m = re.search(r"copied, ([\d.,]+) s", r.stderr)
    return size / (float(m.group(1).replace(",", ".")) if m else wall)


def block_stat(path: Path) -> Path | None:
    """/sys/.../stat of the block device holding `path` (reads completed, sectors read, ...)."""
    dev = os.stat(path).st_dev
    p = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat")
    return p if p.exists() else None


class RequestSizes:
    """Wraps a rate-returning read and records the mean request size the device saw during it."""

    def __init__(self, fn: Callable[[], float], stat: Path | None):
        self.fn, self.stat, self.kib = fn, stat, []

    def _read(self) -> tuple[int, int]:
        f = self.stat.read_text().split()
        return int(f[0]), int(f[2])  # reads completed, 512-byte sectors read

    def __call__(self) -> float:
        if self.stat is None:
            return self.fn()
        n0, s0 = self._read()
        rate = self.fn()
        n1, s1 = self._read()
        if n1 > n0:
            self.kib.append((s1 - s0) * 512 / (n1 - n0) / 1024)
        return rate


def disk_pairs(pairs: int) -> dict:
    """hetero's O_DIRECT probe (the profile's own code) alternating with `dd iflag=direct` on the same
    file: dd as it comes, then dd with its buffer on huge pages like hetero's (HugePagesForDd), where
    the system allows it. Run in a process
    that does no torch compute: a torch process keeps OpenMP threads spinning after each parallel
    region, which takes a core from dd (a separate process) but not from the in-process reader."""
    from hetero.hardware import bench, diskbench

    sz = bench.QUICK
    direct, _ = diskbench.disk_probes(sz)
    if shutil.which("dd") is None:
        return {"note": "no dd"}

    def ours() -> float:
        d0 = len(direct.values)
        direct.sample(1)
        return statistics.median(direct.values[d0:])

    ours()  # builds the probe file and says whether O_DIRECT works here
    if direct.note != "O_DIRECT":
        return {"note": direct.note}
    path = diskbench.probe_file(sz.disk_bytes)
    stat = block_stat(path)
    out = {"note": direct.note}
    for name, huge in (("as_it_comes", False), ("huge_pages", True)):
        if huge and not HugePagesForDd.usable:
            continue
        o, t = RequestSizes(ours, stat), RequestSizes(lambda: dd_direct(path, sz.disk_chunk, huge), stat)
        out[name] = dict(zip(("ours", "theirs", "ratios"), alternate(o, t, pairs)), ours_kib=o.kib, theirs_kib=t.kib)
    return out


def row(name: str, tool: str, o: list[float], t: list[float], r: list[float], check: bool) -> tuple[str, bool]:
    med = statistics.median
    good = abs(med(r) - 1) <= 0.15
    verdict = ("PASS" if good else "FAIL") if check else "(not the check)"
    return (f"| {name} | {med(o) / 1e9:.2f} [{min(o) / 1e9:.2f}..{max(o) / 1e9:.2f}] | {tool} | "
            f"{med(t) / 1e9:.2f} [{min(t) / 1e9:.2f}..{max(t) / 1e9:.2f}] | {med(r):.2f} "
            f"[{min(r):.2f}..{max(r):.2f}] | {verdict} |", good or not check)


def agreement(pairs: int) -> tuple[list[str], bool]:
    """hetero's probes and the independent tools strictly alternate (see `alternate`); the figure
    compared is the median over pairs of hetero / tool. The disk runs in a fresh process of its own
    (see disk_pairs)."""
    import torch

    from hetero.hardware import bench

    sz = bench.QUICK
    threads = torch.get_num_threads()
    probes = {p.key: p for p in bench.device_probes(bench.Backend("cpu"), sz)}
    copy = probes[("mem_bandwidth",)]

    def ours() -> float:
        n0 = len(copy.values)
        copy.sample(1)  # one timed batch of the profile's own probe (>= min_time)
        return statistics.median(copy.values[n0:])

    lines = ["| figure | hetero GB/s (median [min..max]) | independent tool | tool GB/s | hetero / tool, "
             "median [min..max] of pairs | within ±15% |", "|---|---|---|---|---|---|"]
    ok = True
    with torch.inference_mode():
        ours()
        for kind, label, check in (("ufunc", "numpy copy loop (`np.positive(a, out=b)`)", True),
                                   ("memcpy", "numpy `copyto` (libc memcpy)", False)):
            ref = NumpyCopy(sz.copy_bytes, threads, kind)
            o, t, r = alternate(ours, lambda: ref.rate(copy.n), pairs)
            line, good = row("memory copy (read+write)", f"{label}, {threads} threads", o, t, r, check)
            lines.append(line)
            ok &= good
            del ref
    disk = subprocess.run([sys.executable, __file__, "--disk-pairs", str(pairs)], capture_output=True,
                          text=True, check=True)
    d = json.loads(disk.stdout.strip().splitlines()[-1])
    if "as_it_comes" in d:
        kib = lambda xs: f"{statistics.median(xs):.0f} KiB" if xs else "?"  # noqa: E731
        check = "huge_pages" if "huge_pages" in d else "as_it_comes"
        for key, what in (("as_it_comes", "its buffer on whatever pages malloc got"),
                          ("huge_pages", "its buffer on huge pages, like hetero's")):
            if key not in d:
                continue
            r = d[key]
            line, good = row(f"disk read, O_DIRECT, {sz.disk_chunk >> 20} MiB reads, the profile's probe "
                             f"({kib(r['ours_kib'])} per request)", f"dd iflag=direct, {what} "
                             f"({kib(r['theirs_kib'])} per request)", r["ours"], r["theirs"], r["ratios"], key == check)
            lines.append(line)
            ok &= good
    else:
        lines.append(f"| disk read | not compared: {d['note']} | | | | |")
    lines.append(f"\n({pairs} pairs each, strictly alternating, hetero first and last; each tool sample is "
                 f"compared with the mean of the hetero samples either side of it)")
    return lines, ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=24, help="alternating pairs per agreement check")
    ap.add_argument("--skip-stability", action="store_true")
    ap.add_argument("--disk-pairs", type=int, default=0, help=argparse.SUPPRESS)  # the disk check's own process
    a = ap.parse_args()
    if a.disk_pairs:
        print(json.dumps(disk_pairs(a.disk_pairs)))
        return 0
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
    lines, good = agreement(a.pairs)
    ok &= good
    print("agreement with independent tools (side by side, alternating):\n")
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
