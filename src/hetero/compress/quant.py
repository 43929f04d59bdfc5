"""Weight-only quantisation as fake-quant transforms: each returns the dequantised float weight, so
any runtime can load the result and quality is measured on exactly the grid the format stores.

- int8: symmetric per output channel (the runtime's own quantiser, hetero.ops.linear).
- int4: group-wise along the input dim, asymmetric (fp16 scale + min: GGUF Q4_1's grid) or
  symmetric (fp16 scale only, levels -8..7: Q4_0's). A last group the size does not divide is its
  own, shorter group: it is quantised, never skipped. `*_grid` variants return the stored Grid.
- GPTQ (Frantar et al. 2022): quantise one input column at a time and push each column's rounding
  error onto the columns not yet quantised, weighted by the inverse Hessian of the layer's inputs
  (H = 2 XᵀX over calibration tokens). Same storage format as int4 RTN.
"""
from __future__ import annotations

import math

import torch

from hetero.compress.grid import Grid, codes_of, from_values, group_grid, quantize, spans, values_of
from hetero.ops.linear import quantize_int8_per_channel


def int8_rtn(w: torch.Tensor) -> torch.Tensor:
    q, scale = quantize_int8_per_channel(w)
    return q.float() * scale[:, None]


def int8_bytes(shape: tuple[int, ...]) -> int:
    return math.prod(shape) + shape[0] * 2  # int8 values + one bf16 scale per row


def grid(wg: torch.Tensor, sym: bool, zp: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, lo) of a 16-level grid per row of `wg` [N, g], fp16 values (lo None when sym; the
    integer zero point with `zp`)."""
    return group_grid(wg, sym, zp=zp)


def on_grid(w: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor | None, zp: bool = False) -> torch.Tensor:
    """Round w ([N] or [N, g]) to the grid (scale, lo) given per row."""
    q = codes_of(w, scale, lo, zp=zp)
    if w.dim() == 2:
        scale = scale[:, None]
        lo = lo[:, None] if lo is not None else None
    return values_of(q, scale, lo, zp=zp)


def int4_rtn_grid(w: torch.Tensor, group: int = 64, sym: bool = False, zp: bool = False) -> Grid:
    return quantize(w, group, sym, zp=zp)


def int4_rtn(w: torch.Tensor, group: int = 64, sym: bool = False) -> torch.Tensor:
    """Round-to-nearest group-wise int4, dequantised. [N, K] -> [N, K]."""
    return quantize(w, group, sym).dequantize()


def int4_bytes(shape: tuple[int, ...], group: int, sym: bool) -> int:
    n, k = shape[0], math.prod(shape[1:])
    groups = n * math.ceil(k / group)
    return math.ceil(n * k / 2) + groups * (2 if sym else 4)  # bf16 scale (+ bf16 min when asymmetric)


def gptq(w: torch.Tensor, h: torch.Tensor, group: int = 64, sym: bool = False, block: int = 128,
         damp: float = 0.01, act_order: bool = True) -> torch.Tensor:
    """GPTQ int4 of w [N, K] given the input Hessian h [K, K]; returns the dequantised weight."""
    return gptq_grid(w, h, group, sym, block, damp, act_order).dequantize()


def gptq_grid(w: torch.Tensor, h: torch.Tensor, group: int = 64, sym: bool = False, block: int = 128,
              damp: float = 0.01, act_order: bool = True, zp: bool = False) -> Grid:
    """GPTQ int4 of w [N, K] given the input Hessian h [K, K], as the stored grid.

    Group grids are fixed from the original weights before the sweep ("static groups"), so the
    result is in exactly the int4 RTN format even when columns are visited in activation order.
    """
    w = w.float().clone()
    n, k = w.shape
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    sp = spans(k, group)
    zp = zp and not sym
    grids = [grid(w[:, a:b], sym, zp) for a, b in sp]  # fp16 scales: the sweep sees the stored grid
    col_group = torch.tensor([gi for gi, (a, b) in enumerate(sp) for _ in range(a, b)])
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype)
    # Upper Cholesky factor of H^-1: row i holds the update weights for columns after i.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    scales = torch.stack([g[0] for g in grids], dim=1)   # [N, groups]
    los = None if sym else torch.stack([g[1] for g in grids], dim=1)
    gperm = col_group[perm]
    q = torch.zeros_like(w)
    for a in range(0, k, block):
        b = min(a + block, k)
        w1, hinv1 = w[:, a:b].clone(), hinv[a:b, a:b]
        err1 = torch.zeros_like(w1)
        for i in range(b - a):
            g = int(gperm[a + i])
            col = w1[:, i]
            qc = on_grid(col, scales[:, g], los[:, g] if los is not None else None, zp)
            q[:, a + i] = qc
            e = (col - qc) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, b:] -= err1 @ hinv[a:b, b:]
    return from_values(q[:, torch.argsort(perm)].contiguous(), scales, los, group, zp=zp)
