"""GGUF block-quantised weights held as stored: the file's blocks, row by row, and their exact values.

A BlockTensor is a weight [N, K] whose rows (output features) are runs of GGUF blocks exactly as the
file stores them; `dequantize()` gives the values gguf-py's reference `dequantize` gives, bit for bit
(same fp32 operations in the same order). Pure torch, so the same code runs on any device.

Block layouts (bytes per block; w = one weight, q its stored integer):
  Q8_0 (32 weights, 34 B)  d fp16, q int8[32]                              w = d * q
  Q4_0 (32, 18)            d fp16, 16 B nibbles: byte i = q[i] | q[i+16]<<4  w = d * (q - 8)
  Q4_1 (32, 20)            d fp16, m fp16, nibbles as Q4_0                   w = d * q + m
  Q4_K (256, 144)          d, dmin fp16, 12 B of 6-bit (scale, min) for 8 sub-blocks of 32, 128 B
                           nibbles: per 64 weights 32 B, low nibbles sub-block 2j, high 2j+1
                                                                            w = d*sc * q - dmin*mn
  Q5_K (256, 176)          as Q4_K plus 32 B of fifth bits (bit j of byte l: sub-block j, weight l)
  Q6_K (256, 210)          128 B low nibbles, 64 B two high bits, int8 scale per 16, d fp16
                                                                            w = d*sc * (q - 32)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hetero.errors import HeteroError

# (weights per block, bytes per block), as gguf.GGML_QUANT_SIZES has them.
SIZES: dict[str, tuple[int, int]] = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20),
                                     "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
NATIVE_TYPES: tuple[str, ...] = tuple(SIZES)
QUANTIZABLE: tuple[str, ...] = ("Q8_0", "Q4_0", "Q4_1")
# Rows dequantised or quantised at once: bounds the fp32 transient (~4M values, 16 MB).
_CHUNK_ELEMENTS = 1 << 22


def row_bytes(ggml_type: str, k: int) -> int:
    block, size = SIZES[ggml_type]
    return k // block * size


@dataclass(frozen=True)
class BlockTensor:
    ggml_type: str
    data: torch.Tensor          # uint8 [N, row_bytes]: the blocks as stored, one row per output feature
    shape: tuple[int, int]      # (N, K)

    def __post_init__(self):
        if self.ggml_type not in SIZES:
            raise HeteroError(f"GGUF type {self.ggml_type} is not one hetero runs natively "
                              f"(it runs {', '.join(NATIVE_TYPES)})")
        n, k = self.shape
        block = SIZES[self.ggml_type][0]
        if k % block:
            raise HeteroError(f"a {self.ggml_type} weight needs K a multiple of {block}, not {k}")
        if self.data.dtype != torch.uint8 or tuple(self.data.shape) != (n, row_bytes(self.ggml_type, k)):
            raise HeteroError(f"{self.ggml_type} blocks of a [{n}, {k}] weight must be uint8 "
                              f"[{n}, {row_bytes(self.ggml_type, k)}], not {self.data.dtype} {list(self.data.shape)}")

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def rows(self, r0: int, r1: int) -> "BlockTensor":
        """Rows [r0, r1) (a view of the same bytes)."""
        r1 = min(r1, self.shape[0])
        return BlockTensor(self.ggml_type, self.data[r0:r1], (r1 - r0, self.shape[1]))

    def to(self, device) -> "BlockTensor":
        return BlockTensor(self.ggml_type, self.data.to(device).contiguous(), self.shape)

    def dequantize(self) -> torch.Tensor:
        """fp32 [N, K], exactly gguf.quants.dequantize's values."""
        return dequantize_rows(self.ggml_type, self.data, self.shape[1])


def dequantize_rows(ggml_type: str, data: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [n, row_bytes] blocks -> fp32 [n, k] (on data's device), in bounded row chunks."""
    n = data.shape[0]
    out = torch.empty(n, k, dtype=torch.float32, device=data.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, k))
    for r in range(0, n, step):
        out[r:r + step] = _DEQUANT[ggml_type](data[r:r + step].reshape(-1, SIZES[ggml_type][1])).reshape(-1, k)
    return out


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] bytes -> fp32 [..., 1] (little-endian fp16)."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., 16] bytes -> [..., 32] values: low nibbles first, then high (the 32-block order)."""
    return torch.cat([qs & 15, qs >> 4], dim=-1)


def _deq_q8_0(b):  # b: [blocks, 34]
    return _f16(b[:, :2]) * b[:, 2:].contiguous().view(torch.int8).float()


def _deq_q4_0(b):
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]).to(torch.int8) - 8).float()


def _deq_q4_1(b):
    return (_f16(b[:, :2]) * _nibbles(b[:, 4:]).float()) + _f16(b[:, 2:4])


def scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes of packed 6-bit scales [n, 12] -> (sc, mn) uint8 [n, 8] (gguf's get_scale_min)."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k_scales(b):
    sc, mn = scale_min_k4(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc.float()).unsqueeze(-1)       # [n, 8, 1]
    dm = (_f16(b[:, 2:4]) * mn.float()).unsqueeze(-1)
    return d, dm


def _low_high(qs: torch.Tensor) -> torch.Tensor:
    """K-type nibbles [n, 128] -> [n, 8, 32]: per 64 weights, low nibbles then high."""
    q = qs.reshape(-1, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8, device=qs.device).view(1, 1, 2, 1)
    return (q & 15).reshape(-1, 8, 32)


def _deq_q4_k(b):
    d, dm = _k_scales(b)
    return (d * _low_high(b[:, 16:]).float() - dm).reshape(-1, 256)


def _deq_q5_k(b):
    d, dm = _k_scales(b)
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device).view(1, 8, 1)
    qh = (b[:, 16:48].reshape(-1, 1, 32) >> shifts) & 1
    q = _low_high(b[:, 48:]) | (qh << 4)
    return (d * q.float() - dm).reshape(-1, 256)


def _deq_q6_k(b):
    dev = b.device
    ql = b[:, :128].reshape(-1, 2, 1, 64) >> torch.tensor([0, 4], dtype=torch.uint8, device=dev).view(1, 1, 2, 1)
    ql = (ql & 15).reshape(-1, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=dev).view(1, 1, 4, 1)
    qh = b[:, 128:192].reshape(-1, 2, 1, 32) >> shifts
    qh = (qh & 3).reshape(-1, 8, 32)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(-1, 16, 16).float()
    sc = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b[:, 208:210]) * sc).unsqueeze(-1)                      # [n, 16, 1]
    return (d * q).reshape(-1, 256)


_DEQUANT = {"Q8_0": _deq_q8_0, "Q4_0": _deq_q4_0, "Q4_1": _deq_q4_1,
            "Q4_K": _deq_q4_k, "Q5_K": _deq_q5_k, "Q6_K": _deq_q6_k}


# ---- quantising (llama.cpp's reference rounding, as gguf-py writes it) ---------------------------

def _roundf(v: torch.Tensor) -> torch.Tensor:
    """Round half away from zero, as gguf's np_roundf computes it."""
    a = v.abs()
    f = torch.floor(a)
    return torch.sign(v) * (f + torch.floor(2 * (a - f)))


def _inv(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _fp16_bytes(d: torch.Tensor) -> torch.Tensor:
    return d.to(torch.float16).contiguous().view(torch.uint8)    # [n, 1] -> [n, 2]


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    q = q.to(torch.uint8)
    return q[:, :16] | (q[:, 16:] << 4)


def _q_q8_0(x):  # x: [blocks, 32] fp32
    d = x.abs().amax(dim=1, keepdim=True) / 127
    q = _roundf(x * _inv(d)).to(torch.int8).view(torch.uint8)
    return torch.cat([_fp16_bytes(d), q], dim=1)


def _q_q4_0(x):
    idx = x.abs().argmax(dim=1, keepdim=True)
    d = torch.gather(x, 1, idx) / -8
    q = torch.trunc(x * _inv(d) + 8.5).clamp(0, 15)
    return torch.cat([_fp16_bytes(d), _pack_nibbles(q)], dim=1)


def _q_q4_1(x):
    hi, lo = x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True)
    d = (hi - lo) / 15
    q = torch.trunc((x - lo) * _inv(d) + 0.5).clamp(0, 15)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(lo), _pack_nibbles(q)], dim=1)


_QUANT = {"Q8_0": _q_q8_0, "Q4_0": _q_q4_0, "Q4_1": _q_q4_1}


def quantize_blocks(weight: torch.Tensor, ggml_type: str) -> BlockTensor:
    """A float weight [N, K] as GGUF blocks of `ggml_type` (Q8_0, Q4_0, Q4_1): the same bytes
    gguf.quants.quantize writes. K must be a multiple of 32."""
    if ggml_type not in _QUANT:
        raise HeteroError(f"cannot quantise to {ggml_type} here (only {', '.join(QUANTIZABLE)})")
    if weight.dim() != 2 or weight.shape[1] % 32:
        raise HeteroError(f"quantising to {ggml_type} needs a 2-D weight with K a multiple of 32, "
                          f"not {list(weight.shape)}")
    n, k = weight.shape
    out = torch.empty(n, row_bytes(ggml_type, k), dtype=torch.uint8, device=weight.device)
    step = max(1, _CHUNK_ELEMENTS // k)
    for r in range(0, n, step):
        x = weight[r:r + step].float().reshape(-1, 32)
        out[r:r + step] = _QUANT[ggml_type](x).reshape(-1, out.shape[1])
    return BlockTensor(ggml_type, out, (n, k))


def pack_blocks(ggml_type: str, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None) -> BlockTensor:
    """Integer codes already on a block grid as GGUF blocks, with no second rounding.

    codes uint8 [N, K] (Q4_0/Q4_1: 0..15; Q8_0: int8 values -127..127 in an int8 tensor); d and m
    [N, K/32] per-block scale and min (fp32 values fp16 holds exactly: they are stored as fp16).
    Q8_0: w = d*q; Q4_0: w = d*(q-8); Q4_1: w = d*q + m.
    """
    if ggml_type not in _QUANT:
        raise HeteroError(f"cannot pack {ggml_type} blocks here (only {', '.join(QUANTIZABLE)})")
    n, k = codes.shape
    if k % 32 or tuple(d.shape) != (n, k // 32) or (ggml_type == "Q4_1") != (m is not None):
        raise HeteroError(f"{ggml_type} packing needs codes [N, K] with K a multiple of 32 and "
                          f"scales [N, K/32]{' and mins' if ggml_type == 'Q4_1' else ''}")
    if not torch.equal(d.half().float(), d.float()) or (m is not None and not torch.equal(m.half().float(), m.float())):
        raise HeteroError(f"{ggml_type} scales must be fp16 values (round them inside the quantiser)")
    c = codes.reshape(-1, 32)
    parts = [_fp16_bytes(d.reshape(-1, 1))]
    if m is not None:
        parts.append(_fp16_bytes(m.reshape(-1, 1)))
    parts.append(c.to(torch.int8).view(torch.uint8) if ggml_type == "Q8_0" else _pack_nibbles(c))
    data = torch.cat(parts, dim=1).reshape(n, row_bytes(ggml_type, k))
    return BlockTensor(ggml_type, data.contiguous(), (n, k))


def cat_rows(parts: list[BlockTensor]) -> BlockTensor:
    """Row segments of one type and width stacked into one BlockTensor (a fused QKV or gate_up)."""
    t, k = parts[0].ggml_type, parts[0].shape[1]
    if any(p.ggml_type != t or p.shape[1] != k for p in parts):
        raise HeteroError("cat_rows: segments of different types or widths cannot be one BlockTensor")
    data = torch.cat([p.data for p in parts])
    return BlockTensor(t, data, (data.shape[0], k))


# ---- the Q8_0 writer's quantiser (hetero compress): best scale per block, numpy ----------------

# Q8_0 scale search: candidates amax/127 x (1 + j/256), j < 64. j = 0 is round-to-nearest itself, so
# the search is never worse than RTN; on weights that already sit on a coarser grid (a Q4_1 source:
# 16 levels per block) some scale lands on that grid's phase and the block's squared error drops
# ~3x (measured on SmolLM2's layers), which is what a re-export must not lose.
Q8_SEARCH = 64


def quantize_q8_0(arr: np.ndarray, rows_per_chunk: int = 4096, search: int = Q8_SEARCH) -> np.ndarray:
    """[rows, K] float32 -> GGUF Q8_0 bytes [rows, K / 32 * 34] (per block: fp16 scale, 32 int8),
    each block's scale chosen by least squared error over `search` candidates (1: round-to-nearest)."""
    rows, k = arr.shape
    out = np.empty((rows, k // 32 * 34), dtype=np.uint8)
    for r0 in range(0, rows, rows_per_chunk):
        x = arr[r0:r0 + rows_per_chunk].reshape(-1, 32).astype(np.float32)
        amax = np.abs(x).max(axis=1, keepdims=True)
        best_d = np.zeros_like(amax)
        best_err = np.full_like(amax, np.inf)
        for j in range(search):
            d = (amax / 127 * (1 + j / 256)).astype(np.float16).astype(np.float32)
            safe = np.where(d == 0, 1, d)
            err = ((np.clip(np.round(x / safe), -127, 127) * d - x) ** 2).sum(axis=1, keepdims=True)
            better = err < best_err
            best_d = np.where(better, d, best_d)
            best_err = np.where(better, err, best_err)
        safe = np.where(best_d == 0, 1, best_d)
        q = np.clip(np.round(x / safe), -127, 127).astype(np.int8)
        blocks = np.concatenate([best_d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1)
        out[r0:r0 + rows_per_chunk] = blocks.reshape(-1, k // 32 * 34)
    return out
