"""The integer grid a quantiser chose for one matrix, held as it is stored: codes, scales, mins.

A Grid is what an artifact writes (GGUF blocks, compressed-tensors packs) and what the runtime then
runs, so the quality a method measured is the quality of the file. Scales and mins are fp16 values
(kept in fp32 tensors): the quantiser rounds them to fp16 *before* choosing codes, so GPTQ's error
feedback sees the stored grid, and packing never rounds a second time.

Dequantisation uses the fp32 operations of the GGUF reference, in the same order, so a Grid's
values equal the stored blocks' values bit for bit:
  asym (Q4_1):  w = d*q + m      q in 0..15
  sym  (Q4_0):  w = d*(q - 8)    q in 0..15
  int8 (Q8_0):  w = d*q          q in -127..127
  zp:           w = d*(q - z)    q, z in 0..15 (an integer zero point: compressed-tensors' asym grid)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hetero.errors import HeteroError

# The smallest positive fp16 (a subnormal): the floor of a stored scale, so no code divides by 0.
_FP16_TINY = 2.0 ** -24


def fp16(x: torch.Tensor) -> torch.Tensor:
    """x rounded to fp16, held as fp32."""
    return x.half().float()


def spans(k: int, group: int) -> list[tuple[int, int]]:
    """Column ranges of the groups along K; a last group the size does not divide is shorter."""
    return [(a, min(a + group, k)) for a in range(0, k, group)]


def group_grid(wg: torch.Tensor, sym: bool, bits: int = 4, zp: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, min) of one group's grid per row of `wg` [N, g], both fp16 values; min None when sym;
    with `zp` the second is the integer zero point z (as float) instead of a min."""
    if zp and not sym:
        lo, hi = wg.amin(dim=1).clamp(max=0), wg.amax(dim=1).clamp(min=0)  # 0 is a level, as z needs
        d = fp16((hi - lo) / 15.0).clamp(min=_FP16_TINY)
        return d, torch.clamp(torch.round(-lo / d), 0, 15)
    if bits == 8:
        return fp16(wg.abs().amax(dim=1) / 127.0).clamp(min=_FP16_TINY), None
    if sym:
        return fp16(wg.abs().amax(dim=1) / 7.0).clamp(min=_FP16_TINY), None
    lo, hi = wg.amin(dim=1), wg.amax(dim=1)
    return fp16((hi - lo) / 15.0).clamp(min=_FP16_TINY), fp16(lo)


def codes_of(w: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor | None, bits: int = 4,
             zp: bool = False) -> torch.Tensor:
    """Integer codes (as float) of w ([N] or [N, g]) on the grid (scale, lo) given per row."""
    if w.dim() == 2:
        scale = scale[:, None]
        lo = lo[:, None] if lo is not None else None
    if zp and lo is not None:
        return torch.clamp(torch.round(w / scale) + lo, 0, 15)
    if bits == 8:
        return torch.clamp(torch.round(w / scale), -127, 127)
    if lo is None:
        return torch.clamp(torch.round(w / scale), -8, 7) + 8
    return torch.clamp(torch.round((w - lo) / scale), 0, 15)


def values_of(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor | None, bits: int = 4,
              zp: bool = False) -> torch.Tensor:
    """Grid values of codes q (the GGUF reference's fp32 operations); scale/lo broadcast like q."""
    if zp and lo is not None:
        return (q - lo) * scale
    if bits == 8:
        return scale * q
    if lo is None:
        return scale * (q - 8)
    return scale * q + lo


@dataclass
class Grid:
    """One matrix [N, K] on a group-wise grid: codes plus per-(row, group) scale and min."""
    codes: torch.Tensor              # uint8 [N, K] (int4: 0..15) or int8 [N, K] (int8: -127..127)
    scale: torch.Tensor              # fp32 [N, G], fp16 values
    lo: torch.Tensor | None          # fp32 [N, G], fp16 values; None for a symmetric grid
    group: int
    bits: int = 4
    zp: bool = False                 # lo holds integer zero points z: w = d*(q - z)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def sym(self) -> bool:
        return self.lo is None

    def _expand(self, t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(self.group, dim=1)[:, :self.shape[1]]

    def dequantize(self) -> torch.Tensor:
        """fp32 [N, K]: the grid's values, bit for bit those of its GGUF blocks."""
        lo = self._expand(self.lo) if self.lo is not None else None
        return values_of(self.codes.float(), self._expand(self.scale), lo, self.bits, self.zp)

    @property
    def ggml_type(self) -> str:
        return "Q8_0" if self.bits == 8 else ("Q4_0" if self.sym else "Q4_1")

    def blocks(self):
        """The grid as GGUF blocks (Q4_1 asym, Q4_0 sym, Q8_0 int8) without re-rounding; a group of
        64 or 128 repeats its scale over its 32-blocks. Needs K and the group multiples of 32."""
        from hetero.ops.blocks import pack_blocks

        n, k = self.shape
        if self.zp:
            raise HeteroError("a zero-point grid is stored as compressed-tensors (--format ct); GGUF's "
                              "asymmetric blocks (Q4_1) hold a free min: quantise without the zero point")
        if k % 32 or self.group % 32:
            raise HeteroError(f"a [{n}, {k}] matrix with group {self.group} does not map onto GGUF's "
                              "32-blocks (K and the group must be multiples of 32)")
        rep = self.group // 32
        d = self.scale.repeat_interleave(rep, dim=1)[:, :k // 32]
        m = self.lo.repeat_interleave(rep, dim=1)[:, :k // 32] if self.lo is not None else None
        codes = self.codes.to(torch.int8) if self.bits == 8 else self.codes
        return pack_blocks(self.ggml_type, codes, d, m)

    def nbytes(self) -> int:
        """Bytes of the packed codes plus fp16 scales (and mins) at this group size."""
        n, k = self.shape
        groups = n * math.ceil(k / self.group)
        per = 2 if self.sym else (2.5 if self.zp else 4)  # fp16 scale (+ fp16 min, or a 4-bit zero point)
        return math.ceil(n * k * self.bits / 8) + math.ceil(groups * per)


def from_values(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor | None, group: int,
                bits: int = 4, zp: bool = False) -> Grid:
    """The Grid of a fake-quantised matrix whose groups' grids are known: codes are recovered exactly
    (a value sits within float error of its level), then checked to reproduce q bit for bit."""
    n, k = q.shape
    codes = torch.empty(n, k, dtype=torch.int8 if bits == 8 else torch.uint8)
    for gi, (a, b) in enumerate(spans(k, group)):
        s = scale[:, gi]
        lg = lo[:, gi] if lo is not None else None
        codes[:, a:b] = codes_of(q[:, a:b], s, lg, bits, zp).to(codes.dtype)
    g = Grid(codes, scale, lo, group, bits, zp)
    if not torch.equal(g.dequantize(), q):
        raise HeteroError("internal: a quantised matrix is not on its own grid")
    return g


def quantize(w: torch.Tensor, group: int, sym: bool = False, bits: int = 4, zp: bool = False) -> Grid:
    """Round-to-nearest onto the group-wise grid of `w` [N, K] (fp16 scales and mins)."""
    w = w.float()
    n, k = w.shape
    sp = spans(k, group)
    codes = torch.empty(n, k, dtype=torch.int8 if bits == 8 else torch.uint8)
    scales, los = [], []
    for a, b in sp:
        s, lo = group_grid(w[:, a:b], sym, bits, zp)
        codes[:, a:b] = codes_of(w[:, a:b], s, lo, bits, zp).to(codes.dtype)
        scales.append(s)
        los.append(lo)
    lo_t = None if los[0] is None else torch.stack(los, dim=1)
    return Grid(codes, torch.stack(scales, dim=1), lo_t, group, bits, zp and not sym)
