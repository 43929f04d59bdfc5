"""Streamed routed experts: brought in on first use through an LRU cache, a layer's misses read together.

A MoE layer's experts unit (`layers.i.experts`) that is not resident keeps its tensor-cache entry
where the plan put it. Its ExpertBank is the entry's module template; before running expert e it
asks the shared ExpertCache for (unit, e): a hit rebinds nothing, a miss brings that expert's slots
(its fused gate/up and down linears, the rows of the merged tensors) in and evicts the least
recently used expert, unbinding it. Two tiers:
  disk: O_DIRECT reads into page-aligned host buffers (the cache is in RAM);
  ram:  a GPU computes experts kept in pinned host memory; only the experts used are copied to
        the device (the cache is device memory) — never the whole unit per pass.
One token touches k experts per layer, a long prompt all of them: the cache holds at least the
planned depth x k, and as many as its device's spare budget allows (Engine sizes it). A decode
token's k experts of a layer (a prompt's, k at a time) are asked for together and their O_DIRECT
reads run on a few threads at once (get_many). Hits, misses and bytes moved are in
Engine.report()["streaming"] (hetero run / bench) and on /metrics.
"""
from __future__ import annotations

import re
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from hetero.runtime.stream import DirectReader, HostBuffer, bind, unbind
from hetero.runtime.tensorcache import ALIGN, Entry, TensorSlot, align

# O_DIRECT reads in flight at once for get_many (a layer's k misses); more gave little here
READERS = 4
_EXPERT = re.compile(r"^(?:gate_up|down)(\d+)(?:\.|$)")


class ExpertCache:
    """LRU of experts in host RAM, shared by every streamed experts unit: key -> buffer."""

    def __init__(self, capacity: int, slot_bytes: int, tier: str = "disk"):
        """slot_bytes: one expert's host buffer (tier "disk"); tier "ram" copies to the device and
        keeps no host buffers."""
        self.capacity = max(1, int(capacity))
        self.tier = tier
        self.slot_bytes = max(ALIGN, align(slot_bytes))
        self.held: OrderedDict = OrderedDict()          # key -> (HostBuffer, on_evict), oldest first
        self.hits = self.misses = self.evictions = 0
        self.read_bytes = 0
        self.read_s = 0.0
        self.allocated = 0                               # buffers made so far (made on demand)
        self.readers: list[DirectReader] = []            # the streamed units' files, closed with the cache
        self._pool: ThreadPoolExecutor | None = None     # get_many's concurrent reads, made on first use

    def get(self, key, load: Callable[[HostBuffer], int], on_evict: Callable[[], None]) -> HostBuffer:
        """The buffer holding `key`, loading it with `load(buf)` (returns bytes read) on a miss."""
        got = self.held.get(key)
        if got is not None:
            self.held.move_to_end(key)
            self.hits += 1
            return got[0]
        self.misses += 1
        buf = self._slot(len(self.held) >= self.capacity)
        t0 = time.perf_counter()
        self.read_bytes += load(buf)
        self.read_s += time.perf_counter() - t0
        self.held[key] = (buf, on_evict)
        return buf

    def _slot(self, full: bool) -> HostBuffer | None:
        """A buffer for one more expert: the least recently used one's when `full` (evicted), else new."""
        if full:
            _, (buf, evict) = self.held.popitem(last=False)
            evict()
            self.evictions += 1
            return buf
        self.allocated += 1
        return HostBuffer(self.slot_bytes) if self.tier == "disk" else None

    def get_many(self, keys: list, read: Callable, bind_one: Callable, on_evict: Callable) -> None:
        """Bring several keys in at once (one layer's k experts): the misses' reads
        (`read(key, buf)` -> bytes, no Python state touched) run concurrently, then each is bound
        (`bind_one(key, buf)`) in order. Hits, misses and evictions count as `get` one by one would,
        but a key of this call is never evicted by another (hits move to the end first). Why: one
        O_DIRECT request at a time read ~0.4-0.6 GB/s here; 4 in flight ~1.0 (benchmarks/moe_run.py B)."""
        todo = []
        for key in keys:
            if key in self.held:
                self.held.move_to_end(key)
                self.hits += 1
        for key in keys:
            if key in self.held or any(key == k for k, _ in todo):
                continue
            self.misses += 1
            todo.append((key, self._slot(len(self.held) + len(todo) >= self.capacity and bool(self.held))))
        if not todo:
            return
        t0 = time.perf_counter()
        if len(todo) == 1:
            self.read_bytes += read(*todo[0])
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(READERS, thread_name_prefix="expert-read")
            self.read_bytes += sum(self._pool.map(lambda kb: read(*kb), todo))
        self.read_s += time.perf_counter() - t0
        for key, buf in todo:
            bind_one(key, buf)
            self.held[key] = (buf, lambda k=key: on_evict(k))

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        for r in self.readers:
            r.close()
        self.held.clear()

    def stats(self) -> dict:
        return {"kind": "expert_cache", "tier": self.tier, "capacity_experts": self.capacity,
                "held_experts": len(self.held),
                "pool_bytes": self.capacity * self.slot_bytes, "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions, "hit_rate": round(self.hit_rate, 4),
                "read_bytes": self.read_bytes, "read_s": round(self.read_s, 4)}


def expert_slots(entry: Entry) -> dict[int, tuple[TensorSlot, ...]]:
    """An experts unit's tensor slots grouped by expert (children gate_up{e} / down{e})."""
    out: dict[int, list[TensorSlot]] = {}
    for s in entry.slots:
        m = _EXPERT.match(s.module)
        if m is None:
            raise ValueError(f"{entry.unit}: tensor {s.module}.{s.attr} belongs to no expert")
        out.setdefault(int(m.group(1)), []).append(s)
    return {e: tuple(v) for e, v in out.items()}


def expert_bytes(slots: tuple[TensorSlot, ...]) -> int:
    return sum(align(s.nbytes) for s in slots)


class StreamedExperts:
    """Binds a streamed experts unit's template (an ExpertBank) to cached experts as it runs them:
    from disk (`reader`) or from a pinned host copy of the entry's data (`host`, to a GPU)."""

    def __init__(self, entry: Entry, spec, device: str, cache: ExpertCache, reader: DirectReader | None = None,
                 host: torch.Tensor | None = None):
        self.entry, self.cache, self.reader, self.host = entry, cache, reader, host
        if reader is not None:
            cache.readers.append(reader)
        self.device = torch.device(device)
        self.template, self.tree = entry.template(spec, "cpu")
        self.slots = expert_slots(entry)
        # each expert's slots packed from 0 in its buffer (every slot starts page-aligned)
        self.local: dict[int, tuple[TensorSlot, ...]] = {}
        for e, ss in self.slots.items():
            off, packed = 0, []
            for s in ss:
                packed.append(TensorSlot(s.module, s.attr, s.dtype, s.shape, off, s.nbytes))
                off += align(s.nbytes)
            self.local[e] = tuple(packed)
        # an expert whose slots lie in the file as packed here (the entry writes a module's tensors in
        # order, each page-aligned) is one read, not one per tensor: 4 requests of 0.25-1 MiB ran at
        # ~0.9 GB/s from this machine's disk, where it reads ~3 GB/s in large requests
        self.span: dict[int, tuple[int, int] | None] = {}
        for e, ss in self.slots.items():
            start = ss[0].offset
            same = all(s.offset - start == loc.offset for s, loc in zip(ss, self.local[e]))
            self.span[e] = (start, self.local[e][-1].offset + align(ss[-1].nbytes)) if same else None
        self._empty = {s.dtype: torch.empty(0, dtype=s.dtype, device=self.device) for s in entry.slots}
        object.__setattr__(self.template, "fetch", self.fetch)
        self.template.device = str(self.device)

    @property
    def bytes_per_expert(self) -> int:
        return max(expert_bytes(ss) for ss in self.slots.values())

    def fetch(self, *experts: int) -> None:
        """Make these experts' tensors live (a cache hit keeps the binding it already has). From
        disk, several experts' misses are read concurrently (ExpertCache.get_many), in groups the
        cache can hold at once."""
        if self.host is None and len(experts) > 1:
            step = max(1, self.cache.capacity // 2)
            for i in range(0, len(experts), step):
                self.cache.get_many([(self.entry.unit, e) for e in experts[i:i + step]],
                                    lambda key, buf: self._read(key[1], buf),
                                    lambda key, buf: self._bind(key[1], buf), lambda key: self._unbind(key[1]))
            return
        for e in experts:
            self.cache.get((self.entry.unit, e), lambda buf, e=e: self._load(e, buf), lambda e=e: self._unbind(e))

    def _read(self, e: int, buf: HostBuffer) -> int:
        """Expert e's bytes from disk into buf (no module state touched: safe on a reader thread)."""
        span = self.span[e]
        if span is not None:
            self.reader.read_into(buf.view[:span[1]], self.entry.data_offset + span[0], span[1])
            return span[1]
        n = 0
        for s, loc in zip(self.slots[e], self.local[e]):
            size = align(s.nbytes)
            self.reader.read_into(buf.view[loc.offset:loc.offset + size], self.entry.data_offset + s.offset, size)
            n += size
        return n

    def _bind(self, e: int, buf: HostBuffer) -> None:
        bind(self.tree, self.local[e], buf.tensor)
        if self.device.type != "cpu":  # a GPU computes the expert: its copy lives until eviction
            for s in self.local[e]:
                m = self.tree[s.module]
                object.__setattr__(m, s.attr, getattr(m, s.attr).to(self.device))

    def _unbind(self, e: int) -> None:
        unbind(self.tree, self.local[e], self._empty)

    def _load(self, e: int, buf: HostBuffer | None) -> int:
        if self.host is not None:  # pinned host copy -> the device, this expert's slots only
            for s in self.slots[e]:
                t = self.host[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape)
                object.__setattr__(self.tree[s.module], s.attr, t.to(self.device, non_blocking=True))
            return sum(s.nbytes for s in self.slots[e])
        n = self._read(e, buf)
        self._bind(e, buf)
        return n
