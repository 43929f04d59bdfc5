"""Valid random GGUF blocks of each native type, and the float64 reference of their values."""
from __future__ import annotations

import numpy as np
import torch

from hetero.ops.blocks import QUANTIZABLE, SIZES, BlockTensor


def random_blocks(ggml_type: str, n: int, k: int, seed: int = 0, scale: float = 0.05) -> BlockTensor:
    """Q8_0/Q4_0/Q4_1 through gguf-py's own quantiser; the K types as random bytes with fp16 scales
    of a sane size (the rest of a K block is any bit pattern)."""
    import gguf

    rng = np.random.default_rng(seed)
    if ggml_type in QUANTIZABLE:
        w = (rng.standard_normal((n, k)) * scale).astype(np.float32)
        raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType[ggml_type])
        return BlockTensor(ggml_type, torch.from_numpy(np.ascontiguousarray(raw)), (n, k))
    block, size = SIZES[ggml_type]
    raw = rng.integers(0, 256, (n, k // block * size), dtype=np.uint8)
    b = raw.reshape(-1, size)

    def fp16_at(col: int, lo: float, hi: float):
        b[:, col:col + 2] = rng.uniform(lo, hi, (len(b), 1)).astype(np.float16).view(np.uint8)

    if ggml_type == "Q6_K":   # w = d * int8 scale * (q - 32): |w| up to ~ d * 128 * 32
        fp16_at(208, 0.02 * scale / 64, scale / 64 / 16)
    else:                     # w = d * sc * q - dmin * mn, sc and mn up to 63, q up to 15 (31)
        fp16_at(0, scale / 400, scale / 200)
        fp16_at(2, scale / 200, scale / 100)
    return BlockTensor(ggml_type, torch.from_numpy(raw), (n, k))


def reference(bt: BlockTensor) -> torch.Tensor:
    """gguf-py's dequantisation, in float64 [N, K]."""
    import gguf

    w = gguf.quants.dequantize(bt.data.cpu().numpy(), gguf.GGMLQuantizationType[bt.ggml_type])
    return torch.from_numpy(np.asarray(w, dtype=np.float64)).reshape(bt.shape)
