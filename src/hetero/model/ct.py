"""compressed-tensors `pack-quantized` weights (what vLLM and transformers load for int4 GPTQ/AWQ
checkpoints), read as the floats they stand for and written from integer codes.

Per linear PREFIX (e.g. model.layers.0.mlp.up_proj.), instead of PREFIX.weight:
  weight_packed      int32 [N, K/8]   4-bit values u = x_q + 8, element i at bits 4*(i%8) of word i//8
  weight_scale       float [N, K/g]
  weight_zero_point  int32 [N/8, K/g] (asymmetric only) zero points zp + 8, packed the same way along N
  weight_shape       int64 [2]        (N, K)
  w = (x_q - zp) * scale  (zp = 0 when symmetric), in the scale's dtype.
"""
from __future__ import annotations

import torch

from hetero.errors import HeteroError

PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def pack4(u: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [R, C] (C a multiple of 8) -> int32 [R, C/8], 8 values per word."""
    r, c = u.shape
    if c % 8:
        raise HeteroError(f"pack-quantized int4 needs a multiple of 8 values per row, not {c}")
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    words = (u.to(torch.int64).reshape(r, c // 8, 8) << shifts).sum(dim=-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """int32 [R, W] -> uint8 [R, cols] (the inverse of pack4)."""
    b = packed.contiguous().view(torch.uint8).reshape(packed.shape[0], -1)   # little-endian bytes
    return torch.stack((b & 15, b >> 4), dim=-1).reshape(packed.shape[0], -1)[:, :cols]


def is_part(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in PARTS


def dense_shape(packed_shape: tuple[int, ...]) -> tuple[int, int]:
    """(N, K) of a pack-quantized weight from its packed shape (K a multiple of 8, as written)."""
    return packed_shape[0], packed_shape[1] * 8


def dequantize(read, prefix: str) -> torch.Tensor:
    """fp32 [N, K] of the pack-quantized weight at PREFIX, `read(name)` giving its stored tensors."""
    shape = tuple(int(v) for v in read(prefix + "weight_shape").tolist())
    scale = read(prefix + "weight_scale")
    if len(shape) != 2 or scale is None or scale.dim() != 2:
        raise HeteroError(f"{prefix}weight_packed: a 2-D weight with a [N, groups] weight_scale is expected")
    n, k = shape
    x = unpack4(read(prefix + "weight_packed"), k).to(torch.int32) - 8               # [N, K]
    group = -(-k // scale.shape[1])
    zp_packed = read(prefix + "weight_zero_point")
    if zp_packed is not None:
        zp = unpack4(zp_packed.T.contiguous(), n).T.to(torch.int32) - 8              # [N, groups]
        x = x - zp.repeat_interleave(group, dim=1)[:, :k]
    s = scale.repeat_interleave(group, dim=1)[:, :k]
    return (x.to(s.dtype) * s).float()
