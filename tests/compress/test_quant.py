"""Weight-only quantisers: the stored grid, non-divisible dims, agreement with the runtime kernels,
and GPTQ beating round-to-nearest on the layer output it optimises."""
from __future__ import annotations

import pytest
import torch

from hetero.compress.quant import grid, gptq, int4_bytes, int4_rtn, int8_rtn, on_grid
from hetero.ops.linear import Int4Linear, Int8Linear


def _w(n=24, k=176, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def test_int8_matches_the_runtime_kernel():
    w, x = _w(16, 64), torch.randn(5, 64)
    ref = Int8Linear(w, None)(x).float()
    fake = x.bfloat16().float() @ int8_rtn(w).T
    torch.testing.assert_close(fake, ref, rtol=2e-2, atol=2e-2)
    assert (int8_rtn(w) - w).abs().max() <= w.abs().max() / 127 / 2 + 1e-6


@pytest.mark.parametrize("sym", [False, True])
def test_int4_grid_is_what_the_native_kernel_runs(sym):
    from hetero.compress.quant import int4_rtn_grid
    from hetero.ops.native import NativeLinear

    w, x = _w(16, 128), torch.randn(5, 128)
    g = int4_rtn_grid(w, 32, sym)
    blocks = g.blocks()
    assert blocks.ggml_type == ("Q4_0" if sym else "Q4_1")
    assert torch.equal(blocks.dequantize(), int4_rtn(w, 32, sym))  # stored == measured, bit for bit
    torch.testing.assert_close(NativeLinear(blocks)(x), x @ int4_rtn(w, 32, sym).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group", [32, 64])
def test_int4_groups_hold_16_levels_including_a_short_tail(group, sym):
    w = _w(8, 176)  # 176 = 2*64 + 48 = 5*32 + 16: a tail group either way
    q = int4_rtn(w, group, sym)
    for a in range(0, 176, group):
        g, qg = w[:, a:a + group], q[:, a:a + group]
        for r in range(8):
            assert qg[r].unique().numel() <= 16
        scale, lo = grid(g, sym)
        assert ((qg - g).abs() <= scale[:, None] / 2 + 1e-5).all() or sym  # asym grids cover [min, max]
        assert not torch.equal(qg, g)  # the tail is quantised, not skipped
    if sym:  # symmetric levels are integer multiples of the (fp16) scale
        scale = (w[:, :group].abs().amax(1) / 7).half().float()
        ratio = q[:, :group] / scale[:, None]
        torch.testing.assert_close(ratio, ratio.round(), atol=1e-4, rtol=0)


def test_int4_bytes_count_the_tail_group():
    assert int4_bytes((8, 176), 64, sym=False) == 8 * 176 // 2 + 8 * 3 * 4
    assert int4_bytes((8, 176), 32, sym=True) == 8 * 176 // 2 + 8 * 6 * 2


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_the_layer_output_and_stays_on_the_grid(act_order):
    g = torch.Generator().manual_seed(0)
    k, n = 128, 48
    # Correlated inputs with uneven energy per column: where error compensation pays.
    x = torch.randn(2048, k, generator=g) @ (torch.randn(k, k, generator=g) * 0.3 + torch.eye(k))
    x *= torch.linspace(0.2, 3.0, k)
    w = torch.randn(n, k, generator=g)
    h = 2 * x.T @ x / x.shape[0]
    q_rtn, q_gptq = int4_rtn(w, 32), gptq(w, h, 32, act_order=act_order)
    err = lambda q: float(((x @ (w - q).T) ** 2).mean())  # noqa: E731
    assert err(q_gptq) < 0.8 * err(q_rtn)
    # Same format: every group's values lie on the grid fixed from the original weights.
    for a in range(0, k, 32):
        scale, lo = grid(w[:, a:a + 32], sym=False)
        torch.testing.assert_close(on_grid(q_gptq[:, a:a + 32], scale, lo), q_gptq[:, a:a + 32], atol=1e-4, rtol=0)
