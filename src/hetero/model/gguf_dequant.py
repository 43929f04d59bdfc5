"""Whole-tensor dequantisation of the common GGUF block types (Q4_0, Q4_1, Q8_0).

The gguf package dequantises 16 rows at a time, through ~30 small numpy calls per group: for the
built-in 135M-parameter model that is most of a run's start. These do the same fp32 arithmetic in
the same order (so the result is bit-identical) in a few passes over the whole tensor. numpy, not
torch: one thread, so a busy machine's oversubscribed thread pool does not slow it down.
Other types return None and the caller uses the gguf package.
"""
from __future__ import annotations

import numpy as np

# ggml type id -> (values per block, bytes per block)
Q4_0, Q4_1, Q8_0 = 2, 3, 8
BLOCKS = {Q4_0: (32, 18), Q4_1: (32, 20), Q8_0: (32, 34)}


def _f16(blocks: np.ndarray, i: int) -> np.ndarray:
    """The fp16 scalar at byte 2*i of every block -> [n, 1] fp32 (every block size here is even)."""
    return blocks.view(np.float16)[:, i:i + 1].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 2*B] uint8 values: low nibbles are a block's first half, high nibbles its second (ggml's
    Q4 layout), in one contiguous array so the widening to fp32 is one pass."""
    n, half = qs.shape
    q = np.empty((n, 2 * half), dtype=np.uint8)
    np.bitwise_and(qs, 0x0F, out=q[:, :half])
    np.right_shift(qs, 4, out=q[:, half:])
    return q


def dequantize(raw: np.ndarray, ggml_type: int) -> np.ndarray | None:
    """fp32 values (flat) of `raw`, a tensor's blocks as uint8, or None for a type not handled here."""
    if ggml_type not in BLOCKS:
        return None
    values, size = BLOCKS[ggml_type]
    blocks = np.ascontiguousarray(raw).reshape(-1, size)
    if ggml_type == Q8_0:
        out = blocks[:, 2:].view(np.int8).astype(np.float32)
        out *= _f16(blocks, 0)                                   # x * d
    elif ggml_type == Q4_0:
        out = _nibbles(blocks[:, 2:]).astype(np.float32)
        out -= 8                                                 # q - 8: exact in fp32
        out *= _f16(blocks, 0)                                   # (q - 8) * d
    else:
        out = _nibbles(blocks[:, 4:]).astype(np.float32)
        out *= _f16(blocks, 0)
        out += _f16(blocks, 1)                                   # q * d + m
    return out.reshape(-1)
