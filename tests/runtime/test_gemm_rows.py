"""The compiled small-M kernels (a linear's `rows`, batched decode): each row is bit for bit what the
one-token GEMV gives it, so a sequence decoded in a batch sees the numbers it would see alone."""
from __future__ import annotations

import pytest
import torch

from hetero.ops import kernels
from hetero.ops.linear import SMALL_M, make_linear

needs_kernels = pytest.mark.skipif(kernels.get() is None, reason="compiled kernels unavailable here")


@needs_kernels
@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("n,k,bias", [(3072, 576, False), (577, 1536, False), (130, 176, True)])
def test_rows_equal_their_gemv(precision, n, k, bias):
    g = torch.Generator().manual_seed(n)
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g) if bias else None
    lin = make_linear(w, b, precision)
    for m in (2, 3, 5, 8, 13, SMALL_M):
        x = torch.randn(1, m, k, generator=g).to(torch.bfloat16)
        y = lin.rows(x)
        alone = torch.cat([lin(x[:, i:i + 1]) for i in range(m)], dim=1)
        assert y.shape == (1, m, n) and torch.equal(y, alone), (m, (y.float() - alone.float()).abs().max())
    # and they compute the product (not only agree with themselves): against the unquantised weight
    x = torch.randn(4, k, generator=g).to(torch.bfloat16)
    ref = torch.nn.functional.linear(x.float(), w, b)
    err = (lin.rows(x).float() - ref).norm() / ref.norm()
    assert err < (0.02 if precision == "int8" else 0.15), err


@needs_kernels
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_dense_rows_equal_their_gemv(precision):
    g = torch.Generator().manual_seed(7)
    w, b = torch.randn(300, 192, generator=g), torch.randn(300, generator=g)
    lin = make_linear(w, b, precision)
    dt = torch.float32 if precision == "fp32" else torch.bfloat16
    for m in (5, 8, 9, 16):  # one tile pass, a full one, and one of 8 beside the rest
        x = torch.randn(1, m, 192, generator=g).to(dt)
        y, alone = lin.rows(x), torch.cat([lin(x[:, i:i + 1]) for i in range(m)], dim=1)
        assert y.dtype == dt and torch.equal(y, alone), m
    ref = torch.nn.functional.linear(x.float(), w, b)
    assert (y.float() - ref).norm() / ref.norm() < (1e-5 if dt == torch.float32 else 1e-2)


@needs_kernels
@pytest.mark.parametrize("types", [("Q8_0",), ("Q4_0",), ("Q4_1",), ("Q4_K",), ("Q5_K",), ("Q6_K",), ("Q4_K", "Q6_K", "Q8_0")])
def test_gguf_rows_equal_their_gemv(types):
    # each block kind, and a linear of row segments in several kinds (a Q4_K_M QKV); bf16 rows take
    # the bf16 dot-product kernels as the GEMV does (Q8_0 and fp32 rows the fp32 one); logits unrounded
    from tests.ops.blocks_helpers import random_blocks

    segs = [random_blocks(t, 40 + 8 * i, 512, 11 + i, scale=1 / 512 ** 0.5) for i, t in enumerate(types)]
    lin = make_linear(segs, None, "native")
    g = torch.Generator().manual_seed(len(types))
    for dt, m in ((torch.bfloat16, 6), (torch.float32, 6), (torch.bfloat16, 8), (torch.bfloat16, 13)):
        x = torch.randn(1, m, 512, generator=g).to(dt)
        y, alone = lin.rows(x), torch.cat([lin(x[:, i:i + 1]) for i in range(m)], dim=1)
        assert y.dtype == dt and torch.equal(y, alone), (dt, m, (y.float() - alone.float()).abs().max())
    for m in (5, 8, 11):
        x = torch.randn(1, m, 512, generator=g).to(torch.bfloat16)
        logits, alone = lin.logits(x), torch.cat([lin.logits(x[:, i:i + 1]) for i in range(m)], dim=1)
        assert logits.dtype == torch.float32 and torch.equal(logits, alone), m
    w = torch.cat([s.dequantize() for s in segs])
    assert (logits - x.float() @ w.T).abs().max() < 1e-3 * (x.float() @ w.T).abs().max()
