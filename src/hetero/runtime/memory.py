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

import numpy as np

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
            # counted in numpy: a Python loop over 25k pages cost ~6 ms a sample, ~12% of a core
            # at the monitor's 50 ms interval
            return int(np.count_nonzero(np.frombuffer(vec, dtype=np.uint8) & 1)) * _PAGE
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def resident_in(addr: int, nbytes: int) -> int:
    """Bytes of this process's memory [addr, addr + nbytes) that are resident (mincore(2) over the
    whole pages it spans); 0 where it cannot be told."""
    if nbytes <= 0:
        return 0
    start = addr - addr % _PAGE
    length = addr + nbytes - start
    pages = (length + _PAGE - 1) // _PAGE
    vec = (ctypes.c_ubyte * pages)()
    if _c().mincore(ctypes.c_void_p(start), length, vec) != 0:
        return 0
    return int(np.count_nonzero(np.frombuffer(vec, dtype=np.uint8) & 1)) * _PAGE


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
        self._cached: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # mincore over the model's files is kernel time proportional to their size (~2 ms per 150 MB):
    # the page cache is read every FILE_EVERY samples (it grows as weights are read, it does not
    # spike), RSS every sample
    FILE_EVERY = 5

    def sample(self, files: bool = True) -> int:
        if files or self._cached is None:
            self._cached = sum(cached_bytes(f) for f in self.files)
        cached = self._cached
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
        i = 0
        while not self._stop.wait(self.interval):
            i += 1
            self.sample(files=i % self.FILE_EVERY == 0)

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


def fixed_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Allocations of `nbytes` or more get their own mapping, returned to the system when freed.

    glibc raises its threshold after each large free (up to 32 MB), after which a training step's
    transient [rows, V] logits and per-layer graphs come from the heap and stay in RSS: a budgeted
    fine-tune measured 22% over its budget that way, 2% with the threshold fixed. mallopt also
    turns the raising off. False where there is no glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, int(nbytes)))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False
