"""Streaming tiers: units whose weights live on disk (or in host RAM for a GPU) are brought in ahead of use.

A Prefetcher per compute device walks its streamed units in execution order, cyclically (every
forward pass visits them in the same order), running up to `depth` units ahead into a bounded pool
of buffers: one unit computes while the next loads. Disk reads use O_DIRECT into page-aligned
buffers, so nothing lands in the page cache and the measured footprint is honest. On CUDA the pool
is on the device, filled from pinned host buffers on a side stream; events order the copy after the
previous user of a buffer and the compute after the copy.

StreamedUnit wraps a unit's module template: before its forward it binds views of the ready
buffer as its tensors, after it drops them and returns the buffer to the pool.
"""
from __future__ import annotations

import ctypes
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hetero.pagebuf import host_buffer
from hetero.runtime.tensorcache import ALIGN, Entry, TensorSlot, align

CHUNK = 16 << 20  # bytes per read call: large enough to keep the device's queue full


# ---- aligned buffers and O_DIRECT reads ----------------------------------------------------------

class HostBuffer:
    """`nbytes` of page-aligned host memory, as a uint8 tensor and a writable memoryview.

    Pinned (cudaHostAlloc) when `pinned`, so a GPU copy from it is asynchronous; else an anonymous
    mapping on huge pages where possible (hetero.pagebuf: O_DIRECT requests 8x larger, reads ~2.5x
    faster on this machine's disk).
    """

    def __init__(self, nbytes: int, pinned: bool = False):
        self.nbytes = nbytes = max(ALIGN, align(nbytes))
        if pinned:
            raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=True)
            skip = (-raw.data_ptr()) % ALIGN
            self.tensor = raw[skip:skip + nbytes]
            self._keep = raw
            self.view = memoryview((ctypes.c_char * nbytes).from_address(self.tensor.data_ptr())).cast("B")
        else:
            self._keep = host_buffer(nbytes)
            self.tensor = torch.frombuffer(self._keep, dtype=torch.uint8)
            self.view = memoryview(self._keep)


class DirectReader:
    """Aligned reads of one file with O_DIRECT; buffered reads + DONTNEED where O_DIRECT is refused."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
            self.direct = True
        except OSError:
            self.fd = os.open(self.path, os.O_RDONLY)
            self.direct = False

    def read_into(self, view: memoryview, offset: int, nbytes: int) -> None:
        """Fill view[:nbytes] from `offset` (both multiples of ALIGN, view page-aligned)."""
        done = 0
        while done < nbytes:
            want = min(CHUNK, nbytes - done)
            try:
                n = os.preadv(self.fd, [view[done:done + want]], offset + done)
            except OSError:
                if not self.direct:
                    raise
                self._fallback()  # a filesystem that opens O_DIRECT but refuses the read
                continue
            if n <= 0:
                raise EOFError(f"{self.path}: short read at {offset + done}")
            done += n
        if not self.direct:
            os.posix_fadvise(self.fd, offset, nbytes, os.POSIX_FADV_DONTNEED)

    def _fallback(self) -> None:
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_RDONLY)
        self.direct = False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def measure_direct_read(path: str | os.PathLike, nbytes: int | None = None, repeats: int = 3) -> float:
    """O_DIRECT sequential read bytes/s of `path` (best of `repeats`), as the streamer reads it."""
    size = os.path.getsize(path) // ALIGN * ALIGN
    nbytes = min(size, align(nbytes or size))
    buf = HostBuffer(min(nbytes, 64 << 20))
    r = DirectReader(path)
    best = 0.0
    try:
        for _ in range(repeats):
            t0, off = time.perf_counter(), 0
            while off < nbytes:
                n = min(buf.nbytes, nbytes - off)
                r.read_into(buf.view, off, n)
                off += n
            best = max(best, nbytes / (time.perf_counter() - t0))
    finally:
        r.close()
    return best


def bind(tree: dict[str, torch.nn.Module], slots: tuple[TensorSlot, ...], base: torch.Tensor) -> None:
    """Point the template's tensors at views of `base` (a uint8 buffer laid out as the entry's data)."""
    for s in slots:
        t = base[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape)
        object.__setattr__(tree[s.module], s.attr, t)


def unbind(tree: dict[str, torch.nn.Module], slots: tuple[TensorSlot, ...], empty: dict) -> None:
    for s in slots:
        object.__setattr__(tree[s.module], s.attr, empty[s.dtype])


# ---- the prefetcher ------------------------------------------------------------------------------

@dataclass
class StreamItem:
    """Where one streamed unit's bytes come from: a cache entry on disk, or a host copy (RAM -> GPU)."""
    name: str
    nbytes: int
    entry: Entry | None = None
    host: torch.Tensor | None = None    # pinned uint8, for residency "ram"


@dataclass
class Slot:
    host: HostBuffer | None
    dev: torch.Tensor | None            # device pool buffer (cuda) or None (cpu: use host)
    ready: object = None                # cuda event: the copy into `dev` finished
    freed: object = None                # cuda event: the last compute reading `dev` finished
    copied: object = None               # cuda event: the copy out of `host` finished
    busy_s: float = 0.0

    def data(self) -> torch.Tensor:
        return self.dev if self.dev is not None else self.host.tensor


class Prefetcher:
    """Streams `sources` (in execution order, cyclically) up to `depth` units ahead of their use."""

    def __init__(self, sources: list[StreamItem], device: str = "cpu", depth: int = 2, enabled: bool = True):
        self.sources = sources
        self.index = {s.name: i for i, s in enumerate(sources)}
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.enabled = enabled
        self.depth = max(1, depth if enabled else 1)
        cap = max(align(s.nbytes) for s in sources)
        needs_host = any(s.entry is not None for s in sources)
        self.slots = [Slot(HostBuffer(cap, pinned=self.cuda) if needs_host else None,
                           torch.empty(cap, dtype=torch.uint8, device=self.device) if self.cuda else None)
                      for _ in range(self.depth)]
        self.pool_bytes = cap * self.depth * (2 if (self.cuda and needs_host) else 1)
        self.readers = {s.entry.path: None for s in sources if s.entry is not None}
        for p in self.readers:
            self.readers[p] = DirectReader(p)
        self.side = torch.cuda.Stream(self.device) if self.cuda else None
        self.free: queue.Queue = queue.Queue()
        for s in self.slots:
            self.free.put(s)
        self.ready: queue.Queue = queue.Queue()
        self.read_bytes = 0
        self.read_s = 0.0
        self.wait_s = 0.0            # time compute waited for a unit: what prefetch failed to hide
        self._stop = threading.Event()
        self._thread = None
        if enabled:
            self._thread = threading.Thread(target=self._run, name=f"hetero-prefetch-{device}", daemon=True)
            self._thread.start()

    # runs in the prefetch thread (or inline when prefetch is off)
    def _fill(self, slot: Slot, src: StreamItem) -> None:
        t0 = time.perf_counter()
        if src.entry is not None:
            if slot.copied is not None:
                slot.copied.synchronize()  # the previous H2D copy out of this host buffer is done
            self.readers[src.entry.path].read_into(slot.host.view, src.entry.data_offset, src.entry.data_bytes)
            self.read_bytes += src.entry.data_bytes
            host = slot.host.tensor
        else:
            host = src.host
        if self.cuda:
            with torch.cuda.stream(self.side):
                if slot.freed is not None:
                    self.side.wait_event(slot.freed)
                n = align(src.nbytes)
                slot.dev[:n].copy_(host[:n], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self.side)
                slot.ready = slot.copied = ev
        self.read_s += time.perf_counter() - t0

    def _run(self) -> None:
        i = 0
        if self.cuda:
            torch.cuda.set_device(self.device)
        while not self._stop.is_set():
            slot = self.free.get()
            if slot is None or self._stop.is_set():
                return
            src = self.sources[i % len(self.sources)]
            try:
                self._fill(slot, src)
                self.ready.put((src.name, slot, None))
            except BaseException as e:  # handed to the consumer, which raises it
                self.ready.put((src.name, slot, e))
            i += 1

    def get(self, name: str) -> Slot:
        """The buffer holding unit `name`, waiting for it if it is still loading."""
        t0 = time.perf_counter()
        if not self.enabled:
            slot = self.free.get()
            self._fill(slot, self.sources[self.index[name]])
        else:
            while True:
                got, slot, err = self.ready.get()
                if err is not None:
                    self.free.put(slot)
                    raise err
                if got == name:
                    break
                self.free.put(slot)  # a pass was cut short: skip to the unit wanted
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(slot.ready)
        self.wait_s += time.perf_counter() - t0
        return slot

    def release(self, slot: Slot) -> None:
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            slot.freed = ev
        self.free.put(slot)

    def close(self) -> None:
        self._stop.set()
        self.free.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)
        for r in self.readers.values():
            r.close()

    def stats(self) -> dict:
        return {"device": str(self.device), "units": len(self.sources), "depth": self.depth,
                "pool_bytes": self.pool_bytes, "pass_bytes": sum(align(s.nbytes) for s in self.sources), "read_bytes": self.read_bytes,
                "read_s": round(self.read_s, 4), "wait_s": round(self.wait_s, 4),
                "direct": all(r.direct for r in self.readers.values())}


class StreamedUnit(torch.nn.Module):
    """A unit whose tensors are bound from the prefetcher's buffer for the length of one forward."""

    def __init__(self, name: str, template: torch.nn.Module, tree: dict, slots: tuple[TensorSlot, ...],
                 prefetcher: Prefetcher):
        super().__init__()
        object.__setattr__(self, "template", template)  # not a registered child: it owns no tensors
        self.name, self.tree, self.slots, self.prefetcher = name, tree, slots, prefetcher
        self.device = getattr(template, "device", str(prefetcher.device))
        self.dtype = getattr(template, "dtype", None)
        self._empty = {s.dtype: torch.empty(0, dtype=s.dtype, device=prefetcher.device) for s in slots}

    def forward(self, *args, **kwargs):
        slot = self.prefetcher.get(self.name)
        try:
            bind(self.tree, self.slots, slot.data())
            return self.template(*args, **kwargs)
        finally:
            unbind(self.tree, self.slots, self._empty)
            self.prefetcher.release(slot)


class DiskEmbedding:
    """An embedding table left on disk: each lookup reads only its rows (aligned O_DIRECT reads).

    Stands in for the table tensor in Decoder.forward (`embed[ids]`, `embed.device`).
    """

    def __init__(self, entry: Entry, device: str = "cpu", spec=None):
        # the table: a dense or packed `weight`, or a GGUF block table's bytes (NativeEmbedding.table.data)
        s = next(x for x in entry.slots if x.attr == "weight" or (x.module == "table" and x.attr == "data"))
        # A quantised table (runtime.embedding.QuantEmbedding) stores packed rows; its decode turns
        # the bytes read back into values. A dense table's rows are the values themselves.
        self.decode = None
        if s.dtype == torch.uint8 and spec is not None:
            template, _ = entry.template(spec, "cpu")
            self.decode = getattr(template, "decode", None)
        self.entry, self.slot = entry, s
        self.dtype, self.rows, self.dim = s.dtype, s.shape[0], s.shape[1]
        self.row_bytes = self.dim * torch.empty(0, dtype=s.dtype).element_size()
        self.base = entry.data_offset + s.offset
        self.device = torch.device(device)
        self.reader = DirectReader(entry.path)
        self.buf = HostBuffer(align(self.row_bytes) + 2 * ALIGN)
        self.read_bytes = 0

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).tolist()
        out = torch.empty(len(flat), self.dim, dtype=self.dtype)
        rows: dict[int, torch.Tensor] = {}
        for j, r in enumerate(flat):
            if r not in rows:
                start = self.base + r * self.row_bytes
                a0 = start // ALIGN * ALIGN
                n = align(start + self.row_bytes) - a0
                self.reader.read_into(self.buf.view, a0, n)
                self.read_bytes += n
                k = start - a0
                rows[r] = self.buf.tensor[k:k + self.row_bytes].view(self.dtype).clone()
            out[j] = rows[r]
        if self.decode is not None:
            out = self.decode(out)
        return out.view(*ids.shape, out.shape[-1]).to(self.device)

    def close(self) -> None:
        self.reader.close()
