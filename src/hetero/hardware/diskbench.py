"""Disk read bandwidth: sequential reads with O_DIRECT (the disk itself) and through the page cache.

A disk tier that reads through the page cache is not a disk tier, so the planner uses the O_DIRECT
figure for offloaded weights; the cached one says what a re-read of a hot file costs.
"""
from __future__ import annotations

import mmap
import os
import time
from pathlib import Path

from hetero.hardware.bench import Sizes, rate
from hetero.hardware.types import Measurement
from hetero.paths import cache_dir

_ALIGN = 4096  # O_DIRECT needs buffer, offset and length aligned to the logical block size


def probe_file(nbytes: int, directory: Path | None = None) -> Path:
    """A file of random bytes under the cache dir, written once and reused while its size matches."""
    d = directory or cache_dir() / "probe"
    d.mkdir(parents=True, exist_ok=True)
    path = d / "disk-probe.bin"
    nbytes = max(_ALIGN, nbytes // _ALIGN * _ALIGN)
    if path.exists() and path.stat().st_size == nbytes:
        return path
    import numpy as np

    rng = np.random.default_rng(0)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        left = nbytes
        while left:
            # random bytes: a storage layer cannot compress or dedupe them into a faster read
            chunk = rng.bytes(min(left, 8 << 20))
            f.write(chunk)
            left -= len(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def _read_all(fd: int, size: int, buf: mmap.mmap) -> int:
    view = memoryview(buf)
    off = 0
    while off < size:
        got = os.preadv(fd, [view], off)
        if got <= 0:
            break
        off += got
    return off


def _drop_cache(fd: int) -> None:
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def read_direct(path: Path, sz: Sizes) -> tuple[Measurement, str]:
    """(B/s, method): O_DIRECT reads in `disk_chunk` pieces into an aligned (mmap) buffer.

    Filesystems without O_DIRECT (tmpfs, some overlays) fall back to evicting the file from the page
    cache before each pass (posix_fadvise DONTNEED); the method string says which ran.
    """
    size = path.stat().st_size
    chunk = max(_ALIGN, min(sz.disk_chunk, size) // _ALIGN * _ALIGN)
    buf = mmap.mmap(-1, chunk)  # anonymous mmap: page-aligned, as O_DIRECT requires
    method = "O_DIRECT"
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        if not hasattr(os, "O_DIRECT"):
            raise OSError("no O_DIRECT on this platform")
        _read_all(fd, min(size, chunk), buf)  # fails here with EINVAL when unsupported
    except OSError:
        method = "fadvise DONTNEED"
        fd = os.open(path, os.O_RDONLY)
    try:
        secs = []
        for _ in range(max(1, sz.repeats)):
            if method != "O_DIRECT":
                _drop_cache(fd)
            t0 = time.perf_counter()
            got = _read_all(fd, size, buf)
            secs.append(time.perf_counter() - t0)
        return rate(float(got), secs, "B/s"), method
    finally:
        os.close(fd)
        buf.close()


def read_cached(path: Path, sz: Sizes) -> Measurement:
    """B/s re-reading a file that sits in the page cache (one warm-up read loads it)."""
    size = path.stat().st_size
    chunk = max(_ALIGN, min(sz.disk_chunk, size))
    buf = mmap.mmap(-1, chunk)
    fd = os.open(path, os.O_RDONLY)
    try:
        _read_all(fd, size, buf)
        secs = []
        for _ in range(max(1, sz.repeats)):
            t0 = time.perf_counter()
            got = _read_all(fd, size, buf)
            secs.append(time.perf_counter() - t0)
        return rate(float(got), secs, "B/s")
    finally:
        os.close(fd)
        buf.close()
