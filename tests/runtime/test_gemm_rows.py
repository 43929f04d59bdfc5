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
