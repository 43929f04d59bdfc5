"""NativeLinear runs GGUF blocks as stored: decode (compiled GEMV) and prefill (exact dequantise and
GEMM) agree with x @ W.T in float64 for W the file's exact values, in every type."""
from __future__ import annotations

import pytest
import torch

from hetero.errors import HeteroError
from hetero.ops import kernels
from hetero.ops.blocks import NATIVE_TYPES, BlockTensor
from hetero.ops.embedding import TiedEmbedding, make_embedding
from hetero.ops.linear import activation_dtype, cat_rows, gemv_operands, make_linear
from hetero.ops.native import NativeEmbedding, NativeLinear
from tests.ops.blocks_helpers import random_blocks, reference

needs_kernels = pytest.mark.skipif(kernels.get() is None, reason="compiled kernels unavailable here")


@pytest.fixture(params=["compiled", "torch"])
def path(request):
    if request.param == "compiled" and kernels.get() is None:
        pytest.skip("compiled kernels unavailable here")
    kernels.set_enabled(request.param == "compiled")
    yield request.param
    kernels.set_enabled(True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize("t", NATIVE_TYPES)
def test_decode_and_prefill_match_float64(t, path):
    bt = random_blocks(t, 45, 512, seed=7)          # 45 rows: not a multiple of the kernels' 4
    w64 = reference(bt)
    lin = make_linear(bt, None, "native")
    assert isinstance(lin, NativeLinear) and lin.nbytes == bt.nbytes  # the file's bytes, no more
    g = torch.Generator().manual_seed(1)
    x1, x5 = torch.randn(1, 1, 512, generator=g), torch.randn(5, 512, generator=g)
    y1, y5 = lin(x1), lin(x5)
    assert y1.shape == (1, 1, 45) and y1.dtype == torch.float32 and y5.shape == (5, 45)
    assert rel(y1.reshape(1, 45), x1.reshape(1, 512).double() @ w64.T) < 1e-5
    assert rel(y5, x5.double() @ w64.T) < 1e-5


@pytest.mark.parametrize("t", NATIVE_TYPES)
def test_wide_rows_go_in_fours_and_still_match_float64(t, path):
    """Past 16 KB of x a GEMV reads its rows four at a time (below that, one by one in memory order):
    a width of 8448 takes that path for fp32 and bf16 x alike, 9 rows include a tail row."""
    bt = random_blocks(t, 9, 8448, seed=5)
    w64 = reference(bt)
    lin = make_linear(bt, None, "native")
    x = torch.randn(1, 1, 8448, generator=torch.Generator().manual_seed(3))
    assert rel(lin(x).reshape(1, 9), x.reshape(1, 8448).double() @ w64.T) < 1e-5
    xb = x.reshape(8448).to(torch.bfloat16)
    assert rel(lin(xb), w64 @ xb.double()) < 1e-2   # bf16 output (and, on the torch path, bf16 sums)


@needs_kernels
@pytest.mark.parametrize("t", NATIVE_TYPES)
@pytest.mark.parametrize("k", [2048, 8448])
def test_bf16_dot_products_keep_fp32_sums(t, k):
    """The bf16-x kernels' unrounded fp32 outputs (a head's logits) equal W x in float64 for W the
    file's exact values and x the bf16 values, up to fp32 summation: rows one by one (K 2048) and in
    fours (K 8448), 9 rows with a tail. Q4_K reads 128 + q and starts each product from -128 x, so a
    sloppy cancellation of the 128s would show here first."""
    kernels.set_enabled(True)
    bt = random_blocks(t, 9, k, seed=11)
    lin = make_linear(bt, None, "native")
    xb = torch.randn(k, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    y = lin.logits(xb.reshape(1, 1, k))
    assert y.dtype == torch.float32
    assert rel(y.reshape(9), reference(bt) @ xb.double()) < 1e-6   # measured 0.6-3.8e-7


@pytest.mark.parametrize("t", NATIVE_TYPES)
def test_bf16_activations_within_bf16_rounding(t, path):
    bt = random_blocks(t, 64, 256, seed=2)
    w64 = reference(bt)
    lin = make_linear(bt, None, "native")
    for m in (1, 3):
        x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
        y = lin(x)
        assert y.dtype == torch.bfloat16
        ref = x.double() @ w64.T
        # decode: exact weights and fp32 sums, only the output rounded; prefill: a bf16 GEMM
        assert rel(y, ref) < (4e-3 if m == 1 else 1e-2)


@needs_kernels
@pytest.mark.parametrize("t", NATIVE_TYPES)
def test_bf16_decode_is_the_exact_sum_rounded_once(t):
    """A decode GEMV on bf16 x (the bf16 dot-product kernels where the CPU has them) is the float64
    product of the exact weights and x, rounded once to bf16: at most one bf16 step off it (a wrong
    bit in a kernel's weights is off by far more)."""
    kernels.set_enabled(True)
    bt = random_blocks(t, 45, 512, seed=11)
    lin = make_linear(bt, None, "native")
    x = torch.randn(512, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    exact = reference(bt) @ x.double()
    y = lin(x).double()
    assert y.shape == (45,)
    step = exact.abs() * 2.0 ** -7 + 1e-9 * exact.abs().max()
    assert bool(((y - exact).abs() <= step).all()), float(((y - exact).abs() / exact.abs()).max())


def test_mixed_segments_bias_and_stack_operands(path):
    q, k, v = random_blocks("Q4_K", 32, 256, 1), random_blocks("Q6_K", 16, 256, 2), random_blocks("Q6_K", 16, 256, 3)
    fused = cat_rows([q, k, v])
    assert [s.ggml_type for s in fused] == ["Q4_K", "Q6_K"]   # k and v fused: one type
    bias = torch.randn(64)
    lin = make_linear(fused, bias, "native")
    w64 = torch.cat([reference(q), reference(k), reference(v)])
    x = torch.randn(3, 256)
    for xs in (x[:1], x):
        assert rel(lin(xs), xs.double() @ w64.T + bias.double()) < 1e-5
    mixed = gemv_operands(lin)             # mixed types: one stack operand per segment, in row order
    if mixed is not None:
        assert mixed[0] == [kernels.kinds()["q4_k"], kernels.kinds()["q6_k"]]
        assert [w.data_ptr() for w in mixed[1]] == [s.data.data_ptr() for s in lin.segments]
    one = make_linear(q, bias[:32], "native")
    ops = gemv_operands(one)
    assert (ops is not None) == (path == "compiled")
    if ops is not None:
        assert ops[0] == kernels.kinds()["q4_k"] and ops[1].data_ptr() == one.segments[0].data.data_ptr()


@pytest.mark.parametrize("act", ["bf16", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_rows_are_each_groups_alone(dtype, act, path):
    """A ragged step's groups (decode rows, a 1-token chunk, short and long prefill chunks) share
    the weight reads and keep the bits each group gets alone, to the bit."""
    fused = cat_rows([random_blocks("Q4_K", 32, 256, 1), random_blocks("Q6_K", 16, 256, 2)])
    kernels.set_decode_act(act)   # int8: the row kernels and GEMV on int8 activations (where the CPU has them)
    lin = make_linear(fused, torch.randn(48), "native")
    groups = [(0, 3, True), (3, 4, False), (4, 11, False), (11, 51, False), (51, 80, False), (80, 120, False)]
    x = torch.randn(1, 120, 256, generator=torch.Generator().manual_seed(4)).to(dtype)
    alone = torch.cat([(lin.rows if dec else lin)(x[:, a:b]) for a, b, dec in groups], dim=1)
    got = lin.grouped(x, groups)
    assert got.shape == (1, 120, 48) and got.dtype == dtype and torch.equal(got, alone)


def test_a_block_precision_converts_other_segments_and_floats():
    w = torch.randn(40, 256) * 0.05
    a = make_linear(w, None, "q4_1")
    assert [s.ggml_type for s in a.segments] == ["Q4_1"]
    k = random_blocks("Q4_K", 8, 256, 4)
    b = make_linear([k, random_blocks("Q4_1", 8, 256, 5)], None, "q8_0")
    assert [s.ggml_type for s in b.segments] == ["Q8_0"]
    # Q4_K -> Q8_0 from the exact values: close, and unchanged where the type already matches
    assert rel(b.segments[0].rows(0, 8).dequantize(), reference(k)) < 1e-2
    same = make_linear(k, None, "q4_k")
    assert torch.equal(same.segments[0].data, k.data)
    with pytest.raises(HeteroError, match="cannot quantise to Q4_K"):
        make_linear(w, None, "q4_k")
    # the old precisions take blocks too: dequantised first
    d = make_linear(k, None, "fp32")
    assert torch.equal(d.weight, k.dequantize())
    assert activation_dtype("native") == activation_dtype("q4_k") == torch.bfloat16


def test_embedding_gathers_and_dequantises_only_rows():
    table = random_blocks("Q8_0", 100, 64, 6)
    emb = make_embedding(table, "native")
    assert isinstance(emb, NativeEmbedding)
    ids = torch.tensor([[3, 99, 3, 0]])
    got = emb[ids]
    assert got.shape == (1, 4, 64) and got.dtype == torch.bfloat16
    assert torch.equal(got[0].float(), table.dequantize()[ids[0]].to(torch.bfloat16).float())
    q41 = make_embedding(torch.randn(10, 64), "q4_1")
    assert q41.table.ggml_type == "Q4_1"


def test_tied_embedding_reads_a_native_head():
    head = make_linear([random_blocks("Q6_K", 30, 256, 8), random_blocks("Q4_K", 20, 256, 9)], None, "native")
    w = torch.cat([s.dequantize() for s in head.segments])
    tied = TiedEmbedding.tie(head)
    assert tied is not None
    ids = torch.tensor([[49, 0, 29, 30]])
    assert torch.equal(tied[ids][0].float(), w[ids[0]].to(torch.bfloat16).float())


@needs_kernels
@pytest.mark.parametrize("t", NATIVE_TYPES)
def test_stack_reads_each_block_kind(t):
    """One layer of the compiled decode stack in a block kind equals the same step per layer."""
    from hetero.ops.kernels import kinds

    kernels.set_enabled(True)
    H, K, D, E, I = 4, 2, 64, 256, 512
    shapes = [((H + 2 * K) * D, E), (E, H * D), (2 * I, E), (E, I)]
    lins = [make_linear(random_blocks(t, n, k, seed=i, scale=0.5 / k ** 0.5), None, "native")
            for i, (n, k) in enumerate(shapes)]
    ops = [gemv_operands(lin) for lin in lins]
    assert all(op is not None and op[0] == kinds()[t.lower()] for op in ops)
    stack = kernels.get().DecodeStack(H, K, D, E, I, 1e-5, D ** -0.5, True)
    _, w, s, b = (list(z) for z in zip(*ops))
    stack.add_layer([op[0] for op in ops], w, s, b, torch.ones(E), torch.ones(E))
    # the per-layer reference: the same fused ops, each GEMV through NativeLinear
    f = kernels.get()
    x = torch.randn(1, 1, E).to(torch.bfloat16)
    cos, sin = torch.ones(D).to(torch.bfloat16), torch.zeros(D).to(torch.bfloat16)
    kc = [torch.zeros(1, K, 4, D, dtype=torch.bfloat16)]
    vc = [torch.zeros(1, K, 4, D, dtype=torch.bfloat16)]
    got = stack.step(x, 0, cos, sin, kc, vc)
    k2, v2 = torch.zeros_like(kc[0]), torch.zeros_like(vc[0])
    h = f.rmsnorm(x, torch.ones(E), 1e-5)
    qkv = lins[0](h).contiguous()
    attn = f.decode_attention(qkv, cos, sin, k2, v2, 0, H, K, D, D ** -0.5)
    xr, h = f.add_rmsnorm(x, lins[1](attn.view(1, 1, H * D)), torch.ones(E), 1e-5)
    ref = xr + lins[3](f.silu_mul(lins[2](h)))
    assert torch.equal(kc[0], k2)
    assert float((got.float() - ref.float()).abs().max()) <= 2e-2 * float(ref.float().abs().max())
