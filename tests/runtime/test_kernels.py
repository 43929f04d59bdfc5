"""The compiled decode kernels agree with stock torch, and everything works without them."""
from __future__ import annotations

import pytest
import torch

from hetero.ops import kernels
from hetero.ops.linear import make_linear

needs_kernels = pytest.mark.skipif(kernels.get() is None, reason="compiled kernels unavailable here")

# (N, K): a layer shape, a K that needs int8/int4 padding, an N that is not a multiple of the row block.
SHAPES = [(96, 64), (40, 72), (33, 96)]
# Max abs error allowed between the two paths, per precision: fp32 is summation order only;
# bf16 outputs may differ by one bf16 rounding step of values of magnitude ~10.
TOL = {"fp32": 1e-4, "bf16": 0.13, "int8": 0.13, "int4": 0.26}


@pytest.fixture
def with_kernels():
    kernels.set_enabled(True)
    yield
    kernels.set_enabled(True)


def _pair(w, b, prec):
    kernels.set_enabled(True)
    fast = make_linear(w, b, prec)
    kernels.set_enabled(False)
    ref = make_linear(w, b, prec) if (prec != "int4" or w.shape[0] % 16 == 0) else None
    kernels.set_enabled(True)
    return fast, ref


@needs_kernels
@pytest.mark.parametrize("prec", ["fp32", "bf16", "int8", "int4"])
@pytest.mark.parametrize("shape", SHAPES)
def test_fast_linear_matches_torch_path(prec, shape, with_kernels):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=g)
    b = torch.randn(shape[0], generator=g)
    fast, ref = _pair(w, b, prec)
    # The fast path is really in use (dense GEMV needs K % 16 == 0; quantised layers pad K).
    assert fast._k if prec == "int4" else (fast._gemv or (prec in ("fp32", "bf16") and shape[1] % 16))
    for m in (1, 5):  # decode (GEMV) and prefill (GEMM) shapes
        x = torch.randn(1, m, shape[1], generator=g)
        y = fast(x)
        assert y.shape == (1, m, shape[0])
        exact = x @ w.T + b
        if ref is not None:
            torch.testing.assert_close(y.float(), ref(x).float(), atol=TOL[prec], rtol=0)
        # Quantisation error bound vs the float weight (loose; catches layout/nibble-order mistakes).
        rel = (y.float() - exact).norm() / exact.norm()
        assert rel < {"fp32": 1e-6, "bf16": 1e-2, "int8": 2e-2, "int4": 0.15}[prec]


@needs_kernels
def test_int4_layout_decodes_to_the_quantised_weight(with_kernels):
    # Unpack the nibble layout independently in Python; GEMV and dequant must both agree with it.
    w = torch.randn(64, 128)
    lin = make_linear(w, None, "int4")
    p = lin.packed.reshape(64, -1, 16)                                       # [N, G, 16] bytes
    q = torch.cat([p & 0xF, p >> 4], dim=-1).float()                         # [N, G, 32]
    sz = lin.scales_zeros.float()                                            # [N, G, 2]
    ref = ((q - 8) * sz[..., :1] + sz[..., 1:]).reshape(64, 128)
    assert (ref - w).abs().max() < 0.5                                       # it is w, quantised
    x = torch.randn(128)
    torch.testing.assert_close(kernels.get().gemv_int4(x, lin.packed, lin.scales_zeros), ref @ x,
                               atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(kernels.get().dequant_int4(lin.packed, lin.scales_zeros),
                               ref.bfloat16())


def test_disabled_kernels_fall_back_to_torch():
    kernels.set_enabled(False)
    try:
        lin = make_linear(torch.randn(32, 64), None, "fp32")
        assert lin._gemv is None
        x = torch.randn(1, 1, 64)
        torch.testing.assert_close(lin(x), x @ lin.weight.T)
    finally:
        kernels.set_enabled(True)


@needs_kernels
@pytest.mark.parametrize("n,k", [(64, 128), (33, 96), (40, 576)])  # 96: an odd number of groups
def test_int4_gemv_with_bf16_activations(n, k, with_kernels):
    # bf16 x takes the BF16 dot-product kernel (where the CPU has it): exact products, fp32 sums, so
    # it must agree with the independently unpacked weight to the output's bf16 rounding.
    lin = make_linear(torch.randn(n, k, generator=torch.Generator().manual_seed(n)), None, "int4")
    p = lin.packed.reshape(n, -1, 16)
    q = torch.cat([p & 0xF, p >> 4], dim=-1).float()
    sz = lin.scales_zeros.float()
    ref = ((q - 8) * sz[..., :1] + sz[..., 1:]).reshape(n, k)
    x = torch.randn(k, generator=torch.Generator().manual_seed(k)).bfloat16()
    y = kernels.get().gemv_int4(x, lin.packed, lin.scales_zeros)
    assert y.dtype == torch.bfloat16
    want = ref @ x.float()
    torch.testing.assert_close(y.float(), want, atol=1e-3, rtol=2 ** -8)  # a bf16 step at most


@needs_kernels
@pytest.mark.parametrize("n,k", [(33, 96), (1027, 576), (64, 1536), (5, 16)])  # row tails, both threads split rows
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_int8_gemv_matches_torch(n, k, dt, with_kernels):
    # y = scale * (q @ x): fp32 products and sums (bf16 x widened exactly), so it must agree with a
    # float64 torch product to fp32 summation error, then to the output's rounding for bf16 x.
    g = torch.Generator().manual_seed(n + k)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    s = torch.rand(n, generator=g) + 0.01
    x = torch.randn(k, generator=g).to(dt)
    y = kernels.get().gemv_int8(x, q, s)
    assert y.dtype == dt and y.shape == (n,)
    want = (q.double() @ x.double()) * s.double()
    if dt == torch.float32:
        torch.testing.assert_close(y.double(), want, atol=1e-3, rtol=1e-5)
    else:
        torch.testing.assert_close(y.double(), want.to(dt).double(), atol=1e-3, rtol=2 ** -8)  # a bf16 step at most
