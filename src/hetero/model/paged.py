"""Paged KV storage and the layout of one ragged batched step, as the layers see them.

A sequence's KV lives in fixed-size blocks of `block` tokens; its block table maps position p to
slot table[p // block] * block + p % block of the flat per-layer storage. The allocator that hands
out blocks from a byte budget is runtime/kvcache.py; this file only holds tensors and index maths.
Shapes: N packed tokens of the step, K kv heads, D head dim, S longest sequence of the step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hetero.model.spec import ModelSpec


class PagedKV:
    """Per-layer K and V: [n_blocks, block, K, D] each, allocated once (the pool's whole budget)."""

    def __init__(self, spec: ModelSpec, n_blocks: int, block: int, dtypes: list[torch.dtype], devices: list[str]):
        self.n_blocks, self.block = n_blocks, block
        shape = (n_blocks, block, spec.n_kv_heads, spec.head_dim)
        self.k = [torch.zeros(shape, dtype=dt, device=dev) for dt, dev in zip(dtypes, devices)]
        self.v = [torch.zeros(shape, dtype=dt, device=dev) for dt, dev in zip(dtypes, devices)]

    @staticmethod
    def block_bytes(spec: ModelSpec, block: int, dtypes: list[torch.dtype]) -> int:
        """Bytes one block costs over every layer (K and V)."""
        per_token = 2 * spec.n_kv_heads * spec.head_dim
        return sum(block * per_token * torch.empty(0, dtype=dt).element_size() for dt in dtypes)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


@dataclass(frozen=True)
class Segment:
    """One sequence's share of a step: `length` new tokens at positions start.., written to `blocks`."""
    start: int
    length: int
    blocks: tuple[int, ...]


class Ragged:
    """The index tensors of one step, built once and shared by every layer.

    Decode rows (segments of one token) attend together: their KV gathered to [Bd, S, K, D] with the
    padding masked. A longer segment (a prefill chunk) attends alone over its own gathered KV.
    """

    def __init__(self, segments: list[Segment], block: int):
        self.segments = segments
        pos, slots, rows = [], [], []
        row = 0
        for s in segments:
            if not s.length:
                raise ValueError("a segment of no tokens")
            if s.start + s.length > len(s.blocks) * block:
                raise ValueError(f"segment ends at {s.start + s.length} past its {len(s.blocks)} blocks")
            p = list(range(s.start, s.start + s.length))
            pos += p
            slots += [s.blocks[q // block] * block + q % block for q in p]
            rows.append(row)
            row += s.length
        self.n_tokens = row
        self.positions = torch.tensor(pos, dtype=torch.long)                     # [N]
        self.slots = torch.tensor(slots, dtype=torch.long)                       # [N]
        self.last_rows = torch.tensor([r + s.length - 1 for r, s in zip(rows, segments)], dtype=torch.long)

        within = torch.arange(block)

        def gather(s: Segment) -> torch.Tensor:  # the slots of positions 0..end-1
            bt = torch.tensor(s.blocks, dtype=torch.long)
            return (bt[:, None] * block + within).reshape(-1)[:s.start + s.length]

        dec = [i for i, s in enumerate(segments) if s.length == 1]
        self.decode_rows = torch.tensor([rows[i] for i in dec], dtype=torch.long)  # [Bd]
        self.decode_slots = self.decode_bias = None
        if dec:
            S = max(segments[i].start + 1 for i in dec)
            idx = torch.zeros(len(dec), S, dtype=torch.long)
            valid = torch.zeros(len(dec), S, dtype=torch.bool)
            for j, i in enumerate(dec):
                g = gather(segments[i])
                idx[j, :len(g)] = g
                valid[j, :len(g)] = True
            self.decode_slots = idx                                              # [Bd, S]
            # additive: 0 where a key exists, -inf on the padding; [Bd, 1, 1, S] against [Bd, K, G, S]
            self.decode_bias = torch.zeros(len(dec), S).masked_fill(~valid, float("-inf"))[:, None, None, :]
        # (first row, tokens, start, slots of 0..end-1) for each longer segment
        self.chunks = [(rows[i], s.length, s.start, gather(s))
                       for i, s in enumerate(segments) if s.length > 1]
        # Row ranges the linears run on apart: each run of decode rows, each prefill chunk. A row's
        # result then depends only on its own group's size, as alone (the same kernel, the same bits).
        self.groups: list[tuple[int, int]] = []
        for r0, s in zip(rows, segments):
            if s.length == 1 and self.groups and self.groups[-1][2] and self.groups[-1][1] == r0:
                self.groups[-1] = (self.groups[-1][0], r0 + 1, True)
            else:
                self.groups.append((r0, r0 + s.length, s.length == 1))
        self.groups = [(a, b) for a, b, _ in self.groups]
        self._on: dict[str, "Ragged"] = {"cpu": self}

    def on(self, device) -> "Ragged":
        """This layout with its tensors on `device` (moved once per device per step)."""
        key = str(torch.device(device))
        if key not in self._on:
            r = object.__new__(Ragged)
            r.__dict__.update(self.__dict__)
            mv = lambda t: None if t is None else t.to(device)  # noqa: E731
            for name in ("positions", "slots", "last_rows", "decode_rows", "decode_slots", "decode_bias"):
                setattr(r, name, mv(getattr(self, name)))
            r.chunks = [(a, b, c, t.to(device)) for a, b, c, t in self.chunks]
            self._on[key] = r
        return self._on[key]
