"""GGUF blocks as stored: exact dequantisation and llama.cpp's reference quantisation, byte for byte."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hetero.errors import HeteroError
from hetero.ops.blocks import NATIVE_TYPES, QUANTIZABLE, BlockTensor, cat_rows, quantize_blocks
from tests.ops.blocks_helpers import random_blocks, reference


@pytest.mark.parametrize("t", NATIVE_TYPES)
def test_dequantize_is_gguf_bit_for_bit(t):
    bt = random_blocks(t, 19, 512, seed=3)
    ours = bt.dequantize()
    assert ours.dtype == torch.float32 and ours.shape == (19, 512)
    assert torch.isfinite(ours).all() and ours.abs().max() > 0
    assert torch.equal(ours.double(), reference(bt))


@pytest.mark.parametrize("t", QUANTIZABLE)
def test_quantize_blocks_writes_gguf_bytes(t):
    import gguf

    rng = np.random.default_rng(5)
    w = (rng.standard_normal((33, 256)) * rng.uniform(1e-3, 4, (33, 1))).astype(np.float32)
    w[2] = 0.0                 # an all-zero row (zero scale) stays zero
    w[4, :32] = 7.25           # a constant block
    w[5, ::3] = -w[5, ::3]     # ties of |max| with both signs
    ref = gguf.quants.quantize(w, gguf.GGMLQuantizationType[t])
    ours = quantize_blocks(torch.from_numpy(w), t)
    assert ours.shape == (33, 256) and ours.nbytes == ref.size
    assert np.array_equal(ours.data.numpy(), ref)


def test_cat_rows_fuses_one_type_and_refuses_two():
    a, b = random_blocks("Q4_K", 3, 256, 1), random_blocks("Q4_K", 5, 256, 2)
    ab = cat_rows([a, b])
    assert ab.shape == (8, 256) and torch.equal(ab.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    with pytest.raises(HeteroError):
        cat_rows([a, random_blocks("Q6_K", 2, 256)])


def test_bad_blocks_are_one_line_errors():
    with pytest.raises(HeteroError, match="K a multiple of 256"):
        BlockTensor("Q4_K", torch.zeros(2, 72, dtype=torch.uint8), (2, 128))
    with pytest.raises(HeteroError, match="uint8"):
        BlockTensor("Q8_0", torch.zeros(2, 33, dtype=torch.uint8), (2, 32))
    with pytest.raises(HeteroError, match="natively"):
        BlockTensor("IQ2_XS", torch.zeros(2, 2, dtype=torch.uint8), (2, 256))
    with pytest.raises(HeteroError, match="cannot quantise to Q4_K"):
        quantize_blocks(torch.randn(4, 256), "Q4_K")


@pytest.mark.parametrize("t", NATIVE_TYPES)
def test_compiled_dequantise_is_the_same_values(t):
    from hetero.ops import kernels

    if kernels.get() is None:
        pytest.skip("compiled kernels unavailable here")
    bt = random_blocks(t, 21, 512, seed=11)
    got = kernels.get().dequant_gguf(bt.data, kernels.kinds()[t.lower()], 512)
    assert torch.equal(got, bt.dequantize())
