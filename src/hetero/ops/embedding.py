"""The embedding table at a quantised precision: rows stored int8 or int4, dequantised on lookup.

A lookup reads a handful of rows, so the table can be as small as the planner priced it
(dtypes.weight_bytes): int8 is one byte per value plus a bf16 scale per row; int4 is a nibble per
value plus a bf16 scale and zero per group. Each row is one contiguous run of bytes, so a table left
on disk can be read row by row (runtime.stream.DiskEmbedding) and decoded with `decode`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hetero.dtypes import INT4_GROUP
from hetero.errors import HeteroError
from hetero.ops.blocks import BlockTensor
from hetero.ops.linear import (BLOCK_PRECISIONS, check_device, dequant_int4_rows, quantize_int4_groupwise,
                               quantize_int8_per_channel, to_block_type)
from hetero.ops.native import NativeEmbedding, NativeLinear


class QuantEmbedding(torch.nn.Module):
    """`table[ids]` -> bf16 rows [*ids.shape, dim]; `weight` is the packed table [V, row_bytes] uint8."""

    def __init__(self, weight: torch.Tensor, precision: str, device: str = "cpu", group: int = INT4_GROUP):
        super().__init__()
        if precision not in ("int8", "int4"):
            raise ValueError(f"QuantEmbedding holds int8 or int4, not {precision!r}")
        self.precision, self.group = precision, group
        self.rows, self.dim = weight.shape
        self.weight = _pack(weight.float(), precision, group).to(device)

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight[ids.reshape(-1).to(self.weight.device)]
        return self.decode(rows).view(*ids.shape, self.dim)

    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        """Packed rows [n, row_bytes] uint8 -> bf16 values [n, dim]."""
        return _unpack(rows, self.precision, self.dim, self.group)


def _pack(w: torch.Tensor, precision: str, group: int) -> torch.Tensor:
    v, h = w.shape
    if precision == "int8":
        q, scale = quantize_int8_per_channel(w)                       # [V, H] int8, [V] fp32
        s = scale.to(torch.bfloat16).view(v, 1).view(torch.uint8)    # [V, 2]
        return torch.cat([q.view(torch.uint8), s], dim=1).contiguous()
    pad = (-h) % group
    q, scale, zero = quantize_int4_groupwise(F.pad(w, (0, pad)) if pad else w, group)
    q = q[:, :h]
    if h % 2:
        q = F.pad(q, (0, 1))
    packed = q[:, 0::2] | (q[:, 1::2] << 4)                          # [V, ceil(H/2)]
    sz = torch.stack([scale, zero], dim=-1).to(torch.bfloat16)       # [V, G, 2]
    return torch.cat([packed, sz.reshape(v, -1).view(torch.uint8)], dim=1).contiguous()


def _unpack(rows: torch.Tensor, precision: str, dim: int, group: int) -> torch.Tensor:
    n = rows.shape[0]
    if precision == "int8":
        q = rows[:, :dim].view(torch.int8).to(torch.bfloat16)
        scale = rows[:, dim:dim + 2].contiguous().view(torch.bfloat16)  # [n, 1]
        return q * scale
    half = math.ceil(dim / 2)
    packed = rows[:, :half]
    q = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(n, -1)[:, :dim].float()
    groups = math.ceil(dim / group)
    sz = rows[:, half:half + groups * 4].contiguous().view(torch.bfloat16).view(n, groups, 2).float()
    scale = sz[..., 0].repeat_interleave(group, dim=1)[:, :dim]
    zero = sz[..., 1].repeat_interleave(group, dim=1)[:, :dim]
    return ((q - 8.0) * scale + zero).to(torch.bfloat16)


def make_embedding(weight, precision: str, device: str = "cpu"):
    """The table for a unit of `precision`: a dense tensor (fp32/bf16/fp16), a QuantEmbedding, or
    for GGUF blocks (a BlockTensor, precision native or a block type) a NativeEmbedding that
    dequantises only the rows it reads. All are plain torch ops on lookup, so a table on CUDA works
    as on the CPU (not run on a GPU)."""
    check_device(device)
    blocks = isinstance(weight, BlockTensor)
    if precision == "native" and blocks or precision in BLOCK_PRECISIONS:
        table = weight if precision == "native" else to_block_type(weight, precision.upper())
        if isinstance(table, list):
            if len(table) != 1:
                raise HeteroError("an embedding table is one block tensor")
            table = table[0]
        return NativeEmbedding(table, device)
    if blocks:
        weight = weight.dequantize()
    if precision == "native":
        precision = "bf16"
    if precision in ("int8", "int4"):
        return QuantEmbedding(weight, precision, device)
    from hetero.ops.linear import activation_dtype

    return weight.to(device=device, dtype=activation_dtype(precision))


class TiedEmbedding:
    """The embedding of a tied model read from the head's own weights: one matrix in memory, as the
    planner prices it. Gathers rows from the head's layout (dense, int8 per row, or the int4 rows
    layout, or GGUF blocks, on the CPU or CUDA); `tie()` returns None where that layout cannot be read by row."""

    def __init__(self, head: torch.nn.Module, kind: str):
        self.head, self.kind = head, kind

    @staticmethod
    def tie(head: torch.nn.Module) -> "TiedEmbedding | None":
        from hetero.ops.linear import DenseLinear, Int4Linear, Int8Linear

        if isinstance(head, DenseLinear):
            return TiedEmbedding(head, "dense")
        if isinstance(head, Int8Linear):
            return TiedEmbedding(head, "int8")
        if isinstance(head, Int4Linear) and getattr(head, "layout", "") == "rows":
            return TiedEmbedding(head, "int4")
        if isinstance(head, NativeLinear):
            return TiedEmbedding(head, "native")
        # torch's own int4 packings (CPU, CUDA tinygemm) are opaque: the caller keeps a table of its own
        return None

    @property
    def device(self) -> torch.device:
        if self.kind == "native":
            return self.head.segments[0].data.device
        p = next(iter(vars(self.head)[k] for k in ("weight", "qweight", "packed") if k in vars(self.head)))
        return p.device

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        h, flat = self.head, ids.reshape(-1)
        if self.kind == "dense":
            rows = h.weight[flat]
        elif self.kind == "native":  # GGUF blocks: only the rows read are dequantised (exactly)
            rows = h.dequantize_rows(flat).to(torch.bfloat16)
        elif self.kind == "int8":
            rows = h.qweight[flat, :h.in_features].to(torch.bfloat16) * h.scales[flat, None]
        else:  # rows layout (linear.Int4Linear): packed [N, K/2], scales_zeros [N, K/g, 2]
            flat = flat.to(h.packed.device)
            rows = dequant_int4_rows(h.packed[flat], h.scales_zeros[flat])[:, :h.in_features]
        return rows.view(*ids.shape, rows.shape[-1])
