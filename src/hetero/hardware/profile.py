"""The measured profile of this machine: runs the micro-benchmarks once and caches the result per host
under cache_dir()/profiles/<host>.json (<host>.t<N>.json at a thread count N other than the CPU count),
so planning never waits on a benchmark twice.

A cached file that is corrupt, of an older schema version, measured with another thread count or
other decode activations (int8 or bf16, ops.kernels.decode_act), or quick when a full one is asked
for, is ignored with a warning and re-measured.
"""
from __future__ import annotations

import json
import os
import platform
import warnings
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from hetero.hardware import bench, diskbench
from hetero.hardware.types import DeviceProfile, HardwareSpec, Profile
from hetero.paths import cache_dir

PROFILE_VERSION = 3  # 3: GGUF block formats (hetero.ops.native) measured; 2: disk probes read into huge-page buffers, as the runtime does (2-2.5x the rate here)


class ProfileCacheWarning(UserWarning):
    """A cached profile could not be used and is being re-measured."""


def profile_path(host: str, threads: int | None = None) -> Path:
    """The cached profile of `host` measured at `threads` (default: torch's thread count now). Rates
    depend on the thread count, so each count keeps its own file: a `--threads 1` run does not
    overwrite (and so re-measure) the machine's default one. At os.cpu_count() threads: <host>.json."""
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    name = host if threads == os.cpu_count() else f"{host}.t{threads}"
    return cache_dir() / "profiles" / f"{name}.json"


def versions() -> dict[str, str]:
    import numpy
    import torch

    try:
        from importlib.metadata import version
        hetero_v = version("hetero")
    except Exception:
        hetero_v = "unknown"
    return {"torch": torch.__version__, "python": platform.python_version(), "numpy": numpy.__version__,
            "hetero": hetero_v, "threads": str(torch.get_num_threads()), "decode_act": decode_act()}


def decode_act() -> str:
    """The decode activations the GGUF GEMV probes run on in this process (ops.kernels): int8 loops
    stream the blocks 1.1-1.5x as fast as bf16 ones, so a profile holds for one mode."""
    from hetero.ops import kernels

    return kernels.decode_act()


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[str], None]]:
    """Yields `step(label)`: called before each probe runs; shows a rich bar on stderr when enabled
    (stdout stays clean for --json)."""
    if not enabled:
        yield lambda label: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("profiling {task.description:<26}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task("", total=total)
        started = [False]

        def step(label: str) -> None:
            if started[0]:
                bar.advance(task)
            started[0] = True
            bar.update(task, description=label)
        yield step
        bar.update(task, completed=total)


def measure(spec: HardwareSpec, quick: bool = True, progress: bool = True,
            sizes: bench.Sizes | None = None) -> Profile:
    """Run the micro-benchmarks on every compute device of `spec` (cpu, cuda:N) and its disk.

    All probes are sampled in `rounds` interleaved passes, so each figure's samples spread over the
    whole run and a burst of load from another process moves its median less; cheap ones
    (`Probe.spread`: memory bandwidth) get one batch after every second turn of the others.
    """
    import torch

    sz = sizes or (bench.QUICK if quick else bench.FULL)
    probes: list[tuple[str, bench.Probe]] = []
    for dev in spec.compute_devices():
        if dev.kind not in ("cpu", "cuda"):
            continue  # mps/xpu rates are not measured yet; the planner falls back to spec peaks
        probes += [(dev.name, p) for p in bench.device_probes(bench.backend_for(dev.name), sz)]
    if any(d.kind == "disk" for d in spec.devices):
        probes += [("disk", p) for p in diskbench.disk_probes(sz)]

    spread = [p for _, p in probes if p.spread]
    others = [(dev, p) for dev, p in probes if not p.spread]
    total = sum(1 if p.once else sz.rounds for _, p in others)
    with torch.inference_mode(), _progress(progress, total) as step:
        for r in range(sz.rounds):
            for i, (dev, p) in enumerate(others):
                if not (p.once and r):
                    step(f"{dev} {' '.join(p.key)}")
                    p.sample(sz.repeats)
                if (r * len(others) + i) % 2 == 0:
                    for q in spread:
                        q.sample(1)
    for _, p in probes:
        p.release()

    figures: dict[str, dict] = {}
    for dev, p in probes:
        m = p.result()
        if m is None:
            continue  # no kernel for this precision on this device: no row
        d = figures.setdefault(dev, {"gemm": {}, "gemv": {}, "gemm_rows": {}})
        if p.key[0] in ("gemm", "gemv", "gemm_rows"):
            d[p.key[0]][p.key[1]] = m
        else:
            d[p.key[0]] = m
    disk = figures.pop("disk", {})
    devices = {
        name: DeviceProfile(
            device=name, gemm_flops=f["gemm"], gemv_bandwidth=f["gemv"], mem_bandwidth=f.get("mem_bandwidth"),
            op_overhead=f.get("op_overhead"), h2d_pinned=f.get("h2d_pinned"),
            h2d_pageable=f.get("h2d_pageable"), mem_read_bandwidth=f.get("mem_read_bandwidth"),
            gemm_rows=f["gemm_rows"],
            eager_bandwidth=f.get("eager_bandwidth"),
        )
        for name, f in figures.items()
    }
    v = versions()
    note = next((p.note for dev, p in probes if dev == "disk" and p.note), "")
    if note:
        v["disk_read"] = note
    return Profile(host=spec.host, version=PROFILE_VERSION, versions=v, devices=devices,
                   disk_direct=disk.get("disk_direct"), disk_cached=disk.get("disk_cached"),
                   mode="quick" if quick else "full",
                   measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def load_cached(host: str, quick: bool = True) -> Profile | None:
    """The cached profile when it is usable for this request; None (with a warning) when it is not."""
    path = profile_path(host)
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text())
        if not isinstance(d, dict) or d.get("version") != PROFILE_VERSION:
            got = d.get("version") if isinstance(d, dict) else None
            warnings.warn(f"cached profile {path} has version {got}, need {PROFILE_VERSION}; re-measuring",
                          ProfileCacheWarning, stacklevel=3)
            return None
        prof = Profile.from_dict(d)
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"cached profile {path} is unreadable ({type(e).__name__}: {e}); re-measuring",
                      ProfileCacheWarning, stacklevel=3)
        return None
    threads = versions()["threads"]
    if prof.versions.get("threads", threads) != threads:
        warnings.warn(f"cached profile {path} was measured with {prof.versions.get('threads')} threads, "
                      f"now {threads}; re-measuring", ProfileCacheWarning, stacklevel=3)
        return None
    # a profile from before the mode was recorded was measured on bf16 activations
    act = prof.versions.get("decode_act", "bf16")
    if act != decode_act():
        warnings.warn(f"cached profile {path} was measured with {act} decode activations, now "
                      f"{decode_act()}; re-measuring", ProfileCacheWarning, stacklevel=3)
        return None
    if not quick and prof.mode != "full":
        return None  # a full profile was asked for: a quick one does not count, no warning needed
    return prof


def save(prof: Profile) -> Path:
    """Write atomically (temp file + rename): a reader never sees half a profile."""
    threads = prof.versions.get("threads")
    path = profile_path(prof.host, int(threads) if threads and threads.isdigit() else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(prof.to_dict(), indent=1))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left over when writing or renaming failed
    return path


def missing_rows(prof: Profile) -> list[str]:
    """Measured devices of a profile cached before the batched-decode probe existed (no gemm_rows)."""
    return [n for n, d in prof.devices.items() if d.gemm_flops and not d.gemm_rows]


def top_up_rows(prof: Profile, progress: bool = False, sizes: bench.Sizes | None = None,
                force: bool = False) -> Profile:
    """`prof` with the batched-decode probe measured for the devices that lack it (every measured
    device with `force`: the row rates taken again, as a benchmark on a quiet machine wants), saved:
    the rest of the profile, its calibration included, stays as it was."""
    import dataclasses

    import torch

    sz = sizes or (bench.QUICK if prof.mode == "quick" else bench.FULL)
    devices = dict(prof.devices)
    names = [n for n, d in prof.devices.items() if d.gemm_flops] if force else missing_rows(prof)
    with torch.inference_mode(), _progress(progress, len(names)) as step:
        for name in names:
            step(f"{name} gemm_rows")
            probes = bench.rows_probes(bench.backend_for(name), sz)
            for _ in range(sz.rounds):
                for p in probes:
                    p.sample(sz.repeats)
            rows = {p.key[1]: m for p in probes if (m := p.result()) is not None}
            for p in probes:
                p.release()
            devices[name] = dataclasses.replace(devices[name], gemm_rows=rows)
    out = dataclasses.replace(prof, devices=devices)
    save(out)
    return out


def get_profile(refresh: bool = False, quick: bool = True, progress: bool = True,
                sizes: bench.Sizes | None = None) -> Profile:
    """This machine's profile: the cached one when usable, else measured now and cached."""
    from hetero.hardware.inventory import host_name, inventory

    host = host_name()
    if not refresh:
        cached = load_cached(host, quick)
        if cached is not None:
            return top_up_rows(cached, progress, sizes) if missing_rows(cached) else cached
    prof = measure(inventory(), quick=quick, progress=progress, sizes=sizes)
    save(prof)
    return prof


def get_profile_isolated() -> Profile:
    """get_profile() for a run: a missing or stale profile is measured in a child process with this
    process's thread count, so its probe buffers (over 1 GB: they must exceed the last-level cache)
    never count in the run's peak; measured here only if the child could not."""
    import subprocess
    import sys

    import torch

    from hetero.hardware.inventory import host_name

    host = host_name()
    cached = load_cached(host, True)
    if cached is not None and not missing_rows(cached):
        return cached
    threads = torch.get_num_threads()
    # a profile from before the batched-decode probe: only that is measured, the rest kept
    refresh = cached is None
    code = (f"import torch; torch.set_num_threads({threads}); "
            f"from hetero.ops import kernels; kernels.set_decode_act({decode_act()!r}); "
            f"from hetero.hardware.profile import get_profile; get_profile(refresh={refresh}, progress=False)")
    print("note: measuring this machine's profile once, in a child process" if refresh else
          "note: measuring this machine's batched-decode rates once, in a child process", file=sys.stderr, flush=True)
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                       stdout=subprocess.DEVNULL)
    if r.returncode == 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ProfileCacheWarning)
            prof = load_cached(host, True)
        if prof is not None:
            return prof
    return get_profile(refresh=refresh)


def with_eager_rate(prof: Profile | None, device: str = "cpu") -> Profile | None:
    """`prof` with the CPU's eager_bandwidth filled in when it was measured before that figure
    existed: the one probe (~0.2 s) now, written back to the cached profile, so that a training step
    (plan/train.py) is priced at a measured rate rather than the fallback. Anything else: unchanged."""
    import dataclasses

    dp = prof.devices.get(device) if prof is not None else None
    if dp is None or dp.eager_bandwidth is not None:
        return prof
    p = next(p for p in bench.device_probes(bench.Backend(device), bench.QUICK) if p.key == ("eager_bandwidth",))
    p.sample(5)
    m = p.result()
    p.release()
    if m is None:
        return prof
    prof = dataclasses.replace(prof, devices={**prof.devices, device: dataclasses.replace(dp, eager_bandwidth=m)})
    try:
        save(prof)
    except OSError:
        pass  # a read-only cache: this run still uses the figure
    return prof
