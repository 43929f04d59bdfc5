"""Disk read bandwidth: sequential reads with O_DIRECT (the disk itself) and through the page cache.

A disk tier that reads through the page cache is not a disk tier, so the planner uses the O_DIRECT
figure for offloaded weights; the cached one says what a re-read of a hot file costs.
"""
from __future__ import annotations

import os
from pathlib import Path

from hetero.hardware.bench import Probe, Sizes
from hetero.pagebuf import host_buffer
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


def _read_all(fd: int, size: int, buf) -> int:
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


class DirectRead:
    """Reads the whole file, bypassing the page cache: O_DIRECT in `chunk` pieces into an aligned
    buffer, on huge pages like the runtime's (hetero.pagebuf). Filesystems
    without O_DIRECT (tmpfs, some overlays) fall back to evicting the file before each pass
    (posix_fadvise DONTNEED); `method` says which ran."""

    def __init__(self, path: Path, chunk: int):
        self.path, self.size = path, path.stat().st_size
        self.buf = host_buffer(max(_ALIGN, min(chunk, self.size) // _ALIGN * _ALIGN))
        self.method = "O_DIRECT"
        try:
            if not hasattr(os, "O_DIRECT"):
                raise OSError("no O_DIRECT on this platform")
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            try:
                _read_all(fd, len(self.buf), self.buf)  # EINVAL here when the filesystem refuses
            finally:
                os.close(fd)
        except OSError:
            self.method = "fadvise DONTNEED"

    def __call__(self) -> int:
        direct = self.method == "O_DIRECT"
        fd = os.open(self.path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        try:
            if not direct:
                _drop_cache(fd)
            return _read_all(fd, self.size, self.buf)
        finally:
            os.close(fd)


class CachedRead:
    """Re-reads a file that sits in the page cache (the first call loads it)."""

    def __init__(self, path: Path, chunk: int):
        self.path, self.size = path, path.stat().st_size
        self.buf = host_buffer(max(_ALIGN, min(chunk, self.size)))

    def __call__(self) -> int:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return _read_all(fd, self.size, self.buf)
        finally:
            os.close(fd)


def disk_probes(sz: Sizes) -> list[Probe]:
    """(O_DIRECT read, page-cache read) of the probe file under the cache dir, as probes; each call
    reads the whole file, one call per batch."""
    state: dict = {}

    def path() -> Path:
        if "path" not in state:
            state["path"] = probe_file(sz.disk_bytes)
        return state["path"]

    def make_direct():
        reader = DirectRead(path(), sz.disk_chunk)
        direct.note = reader.method
        return reader

    size = float(max(_ALIGN, sz.disk_bytes // _ALIGN * _ALIGN))
    direct = Probe(("disk_direct",), "B/s", size, make_direct, lambda: None, 0.0)
    cached = Probe(("disk_cached",), "B/s", size, lambda: CachedRead(path(), sz.disk_chunk), lambda: None, 0.0)
    return [direct, cached]
