"""The process's memory footprint as a user's memory limit sees it.

footprint = RSS (anonymous + file-backed pages mapped by this process: interpreter, libraries,
weights, KV cache, buffers) + the model's file pages sitting in the page cache (weights read
through it count, as they would against a cgroup limit). Page-cache residency is measured with
mincore(2) on a fresh read-only mapping of each file, so nothing is read to measure it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import resource
import threading
import time
from pathlib import Path

_PAGE = os.sysconf("SC_PAGE_SIZE")
_libc = None


def _c():
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        _libc = lib
    return _libc


def rss_bytes() -> int:
    """Resident set size now (statm: pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def peak_rss_bytes() -> int:
    """The process's lifetime peak RSS.

    Linux's VmHWM is the peak of this process's own address space. ru_maxrss is not: a process
    started by a large parent (vfork + exec, as subprocess does) inherits the parent's peak in it.
    """
    hwm = proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux, bytes on macOS


def proc_status_bytes(field: str) -> int | None:
    """A kB field of /proc/self/status (VmHWM, RssAnon, ...) in bytes; None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cached_bytes(path: str | os.PathLike) -> int:
    """Bytes of `path` resident in the page cache (0 for a missing or empty file)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return 0
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        libc = _c()
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return 0
        try:
            pages = (size + _PAGE - 1) // _PAGE
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) != 0:
                return 0
            return sum(b & 1 for b in bytes(vec)) * _PAGE
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def drop_cache(path: str | os.PathLike) -> None:
    """Ask the kernel to evict `path`'s clean pages (posix_fadvise DONTNEED); dirty ones are synced first."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


class Footprint:
    """Samples RSS + the model files' page-cache bytes in a thread; `peak` is the largest seen.

    The lifetime peak RSS (ru_maxrss) is folded in, so a spike between samples is not missed.
    """

    def __init__(self, files: list[Path] | None = None, interval_s: float = 0.05):
        self.files = list(files or [])
        self.interval = interval_s
        self.peak = 0
        self.peak_cached = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        cached = sum(cached_bytes(f) for f in self.files)
        now = rss_bytes() + cached
        self.peak = max(self.peak, now, peak_rss_bytes())
        self.peak_cached = max(self.peak_cached, cached)
        return now

    def start(self) -> "Footprint":
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="hetero-footprint", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        return self.peak

    def __enter__(self) -> "Footprint":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def runtime_baseline(model: str | None = None) -> int:
    """Bytes the runtime itself holds before any weights: interpreter, torch and hetero's modules,
    the allocator's first arenas, the planner's first plan, and (given `model`) that model's
    tokenizer — tens of MB for a large vocabulary, held for the whole run. Measured in this process, after importing and loading
    what a run does; the planner takes it off the budget (Plan.reserve)."""
    import torch  # noqa: F401  (the imports are the point: their pages are part of the baseline)

    import hetero.model.llama  # noqa: F401
    import hetero.model.tokenizer  # noqa: F401
    import hetero.plan.make  # noqa: F401  (scipy: a run that plans holds it)
    import hetero.runtime.engine  # noqa: F401
    import hetero.runtime.generate  # noqa: F401
    import scipy.optimize  # noqa: F401  (the planner's solver loads it on first use: a planned run holds it)
    import transformers  # noqa: F401  (the tokenizer of every real model comes through it)

    _warm_forward()
    _warm_plan()
    if model is None:
        return rss_bytes()
    from hetero.model.sources import resolve, resolve_spec
    from hetero.model.tokenizer import load_tokenizer

    tok = load_tokenizer(resolve(model), resolve_spec(model).vocab_size, None)  # noqa: F841 (alive while measured)
    return rss_bytes()


def _warm_plan() -> None:
    """One plan of a tiny model on this machine's inventory (no profile: nothing is measured). The
    first plan of a process builds the solver's state and cost tables, ~4 MB that stay; measured
    without it the reserve came out that much under the process a planned run becomes."""
    from hetero.hardware.inventory import inventory
    from hetero.model.sources import resolve_spec
    from hetero.plan.make import make_plan

    from hetero.errors import HeteroError

    try:
        make_plan(resolve_spec("synthetic:tiny"), inventory(), None, memory={"cpu": 1 << 30}, prompt_tokens=8,
                  context=16)
    except HeteroError:
        pass  # a warm-up only: a machine where even this cannot be planned fails later, with its own message


def _warm_forward() -> None:
    """One prefill and one decode step of a tiny random model at every CPU precision: the first
    forward initialises thread pools, oneDNN kernels and allocator arenas, which stay for good."""
    import torch

    from hetero.model.hf import spec_from_config
    from hetero.model.llama import LlamaModel, UnitConfig
    from hetero.model.synthetic import config

    spec = spec_from_config(config("tiny"), source="synthetic:tiny", fmt="synthetic")
    gen = torch.Generator().manual_seed(0)
    shapes = dict(__import__("hetero.model.spec", fromlist=["expected_tensors"]).expected_tensors(spec))

    def weights(name: str) -> torch.Tensor:
        return torch.randn(shapes[name], generator=gen) * 0.1

    for prec in ("fp32", "bf16", "int8", "int4"):
        net = LlamaModel(spec, weights, default=UnitConfig("cpu", prec))
        cache = net.new_cache(1, 24)
        net(torch.arange(16).view(1, 16), 0, cache)
        net(torch.tensor([[1]]), 16, cache)
