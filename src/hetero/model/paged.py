"""Paged KV storage and the layout of one ragged batched step, as the layers see them.

A sequence's KV lives in fixed-size blocks of `block` tokens; its block table maps position p to
slot table[p // block] * block + p % block of the flat per-layer storage. The allocator that hands
out blocks from a byte budget is runtime/kvcache.py; this file only holds tensors and index maths.
Shapes: N packed tokens of the step, K kv heads, D head dim, S longest sequence of the step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hetero.dtypes import kv_head_bytes
from hetero.model.kvstore import nbytes as kv_nbytes, new_store
from hetero.model.spec import ModelSpec


class PagedKV:
    """Per-layer K and V: [n_blocks, K, block, D] each, allocated once (the pool's whole budget).
    Head-major inside a block, so a gather of whole blocks is a batch of [block, D] matrices per
    head that attention multiplies in place (no second copy to reorder it)."""

    def __init__(self, spec: ModelSpec, n_blocks: int, block: int, dtypes: list[torch.dtype], devices: list[str],
                 kv_dtype: str = "auto"):
        self.n_blocks, self.block, self.kv_dtype = n_blocks, block, kv_dtype
        shape = (n_blocks, spec.n_kv_heads, block, spec.head_dim)
        # kv_dtype other than the layers' own: model/kvstore stores, indexed as the tensors are
        self.k = [new_store(shape, kv_dtype, dt, dev) for dt, dev in zip(dtypes, devices)]
        self.v = [new_store(shape, kv_dtype, dt, dev) for dt, dev in zip(dtypes, devices)]

    @staticmethod
    def block_bytes(spec: ModelSpec, block: int, dtypes: list[torch.dtype], kv_dtype: str = "auto") -> int:
        """Bytes one block costs over every layer (K and V)."""
        per_head = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
        return sum(block * 2 * spec.n_kv_heads * kv_head_bytes(spec.head_dim, per_head[dt], kv_dtype)
                   for dt in dtypes)

    def nbytes(self) -> int:
        return sum(kv_nbytes(t) for t in self.k + self.v)


@dataclass(frozen=True)
class Segment:
    """One sequence's share of a step: `length` new tokens at positions start.., written to `blocks`."""
    start: int
    length: int
    blocks: tuple[int, ...]


class Ragged:
    """The index tensors of one step, built once and shared by every layer.

    Each new token is written at (its block, its offset in the block). Decode rows (segments of one
    token) attend together over their blocks gathered to [Bd, nb, K, block, D], the padding past
    each one's length masked. A longer segment (a prefill chunk) attends alone over its own blocks.
    """

    def __init__(self, segments: list[Segment], block: int):
        self.segments, self.block = segments, block
        pos, wblk, rows = [], [], []
        row = 0
        for s in segments:
            if not s.length:
                raise ValueError("a segment of no tokens")
            if s.start + s.length > len(s.blocks) * block:
                raise ValueError(f"segment ends at {s.start + s.length} past its {len(s.blocks)} blocks")
            p = range(s.start, s.start + s.length)
            pos += p
            wblk += [s.blocks[q // block] for q in p]
            rows.append(row)
            row += s.length
        self.n_tokens = row
        self.positions = torch.tensor(pos, dtype=torch.long)                     # [N]
        self.write_blocks = torch.tensor(wblk, dtype=torch.long)                 # [N]
        self.write_offsets = self.positions % block                              # [N]
        self.last_rows = torch.tensor([r + s.length - 1 for r, s in zip(rows, segments)], dtype=torch.long)

        def used(s: Segment) -> int:  # blocks holding positions 0..end-1
            return -(-(s.start + s.length) // block)

        dec = [i for i, s in enumerate(segments) if s.length == 1]
        self.decode_rows = torch.tensor([rows[i] for i in dec], dtype=torch.long)  # [Bd]
        self.decode_blocks = self.decode_bias = None
        if dec:
            nb = max(used(segments[i]) for i in dec)
            idx = torch.zeros(len(dec), nb, dtype=torch.long)        # padding reads block 0, masked
            ends = torch.tensor([segments[i].start + 1 for i in dec])
            for j, i in enumerate(dec):
                u = used(segments[i])
                idx[j, :u] = torch.tensor(segments[i].blocks[:u])
            self.decode_blocks = idx                                             # [Bd, nb]
            # additive: 0 where a key exists, -inf past the end; [Bd, 1, 1, nb * block]
            valid = torch.arange(nb * block)[None, :] < ends[:, None]
            self.decode_bias = torch.zeros(len(dec), nb * block).masked_fill(~valid, float("-inf"))[:, None, None, :]
        # (first row, tokens, start, its used blocks) for each longer segment
        self.chunks = [(rows[i], s.length, s.start, torch.tensor(s.blocks[:used(s)], dtype=torch.long))
                       for i, s in enumerate(segments) if s.length > 1]
        # Row ranges the linears run on apart: each run of decode rows (a linear's `rows` kernel: each
        # row the GEMV's bits), each prefill chunk (its forward, as alone): every row gets the kernel,
        # hence the bits, it gets in a single-sequence run.
        groups: list[list] = []
        for r0, s in zip(rows, segments):
            if s.length == 1 and groups and groups[-1][2] and groups[-1][1] == r0:
                groups[-1][1] = r0 + 1
            else:
                groups.append([r0, r0 + s.length, s.length == 1])
        self.groups = [tuple(g) for g in groups]                                # (first, end, decode)
        self._on: dict[str, "Ragged"] = {"cpu": self}

    def on(self, device) -> "Ragged":
        """This layout with its tensors on `device` (moved once per device per step)."""
        key = str(torch.device(device))
        if key not in self._on:
            r = object.__new__(Ragged)
            r.__dict__.update(self.__dict__)
            mv = lambda t: None if t is None else t.to(device)  # noqa: E731
            for name in ("positions", "write_blocks", "write_offsets", "last_rows", "decode_rows",
                         "decode_blocks", "decode_bias"):
                setattr(r, name, mv(getattr(self, name)))
            r.chunks = [(a, b, c, t.to(device)) for a, b, c, t in self.chunks]
            self._on[key] = r
        return self._on[key]
