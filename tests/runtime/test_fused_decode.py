"""Fused decode-step kernels (norm, RoPE + KV write + attention, silu*mul) agree with the torch path."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import hetero
from hetero.model.llama import apply_rope, rms_norm
from hetero.ops import kernels
from tests.model.helpers import write_tiny_checkpoint

needs_kernels = pytest.mark.skipif(kernels.get() is None, reason="compiled kernels unavailable here")
# fp32: summation order only. bf16: both paths round at the same points; allow one bf16 step.
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def _restore():
    kernels.set_enabled(True)
    yield
    kernels.set_enabled(True)


@needs_kernels
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_rmsnorm_and_add_rmsnorm(dt):
    g = torch.Generator().manual_seed(0)
    x, y, w = torch.randn(1, 1, 96, generator=g).to(dt), torch.randn(1, 1, 96, generator=g).to(dt), torch.randn(96, generator=g)
    k = kernels.get()
    torch.testing.assert_close(k.rmsnorm(x, w, 1e-5).float(), rms_norm(x, w, 1e-5).float(), atol=TOL[dt], rtol=0)
    s, h = k.add_rmsnorm(x, y, w, 1e-5)
    assert s.dtype == h.dtype == dt
    torch.testing.assert_close(s, x + y)
    torch.testing.assert_close(h.float(), rms_norm(x + y, w, 1e-5).float(), atol=TOL[dt], rtol=0)


@needs_kernels
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_silu_mul(dt):
    gu = torch.randn(1, 1, 2 * 80, generator=torch.Generator().manual_seed(1)).to(dt)
    gate, up = gu.chunk(2, dim=-1)
    torch.testing.assert_close(kernels.get().silu_mul(gu).float(), (F.silu(gate) * up).float(),
                               atol=TOL[dt], rtol=0)


@needs_kernels
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,K,D,pos", [(4, 4, 16, 0), (9, 3, 64, 37), (8, 2, 32, 300)])
def test_decode_attention_matches_reference(dt, H, K, D, pos):
    g = torch.Generator().manual_seed(2)
    L = pos + 5
    qkv = torch.randn(1, 1, (H + 2 * K) * D, generator=g).to(dt)
    angles = torch.randn(1, D // 2, generator=g) * 3
    cos, sin = torch.cat([angles, angles], -1).cos().to(dt), torch.cat([angles, angles], -1).sin().to(dt)
    kc, vc = torch.randn(1, K, L, D, generator=g).to(dt), torch.randn(1, K, L, D, generator=g).to(dt)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    scale = 1 / math.sqrt(D)
    out = kernels.get().decode_attention(qkv, cos, sin, kc, vc, pos, H, K, D, scale)
    # Reference: the decoder's torch path.
    q, k, v = qkv.split([H * D, K * D, K * D], dim=-1)
    q, k = apply_rope(q.view(1, 1, H, D).transpose(1, 2), cos, sin), apply_rope(k.view(1, 1, K, D).transpose(1, 2), cos, sin)
    kc_ref[:, :, pos:pos + 1], vc_ref[:, :, pos:pos + 1] = k, v.view(1, 1, K, D).transpose(1, 2)
    torch.testing.assert_close(kc, kc_ref, atol=TOL[dt], rtol=0)
    torch.testing.assert_close(vc, vc_ref)
    kk, vv = kc_ref[:, :, :pos + 1], vc_ref[:, :, :pos + 1]
    scores = torch.matmul(q.view(1, K, H // K, D), kk.transpose(-1, -2)) * scale
    want = torch.matmul(torch.softmax(scores.float(), -1).to(dt), vv).reshape(H * D)
    assert out.dtype == dt
    torch.testing.assert_close(out.float(), want.float(), atol=TOL[dt], rtol=0)


def _greedy(net, prompt: torch.Tensor, n: int) -> tuple[list[int], torch.Tensor]:
    cache = net.new_cache(1, prompt.shape[1] + n)
    logits = net(prompt, 0, cache)
    out, last = [], []
    for i in range(n):
        tok = int(logits[0].argmax())
        out.append(tok)
        last.append(logits[0])
        logits = net(torch.tensor([[tok]]), prompt.shape[1] + i, cache)
    return out, torch.stack(last)


@needs_kernels
@pytest.mark.parametrize("source", ["synthetic:tiny", "hf:mistral_gqa"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_decode_with_kernels_on_and_off_gives_same_tokens(source, dtype, tmp_path):
    if source.startswith("hf:"):
        write_tiny_checkpoint(source[3:], tmp_path)
        source = str(tmp_path)
    prompt = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(4))
    runs = {}
    for on in (True, False):
        kernels.set_enabled(on)
        net = hetero.load(source, dtype=dtype).net
        assert (net.layers[0]._fused is not None) == on
        runs[on] = _greedy(net, prompt, 12)
    assert runs[True][0] == runs[False][0]
    if dtype == "fp32":
        torch.testing.assert_close(runs[True][1], runs[False][1], atol=1e-4, rtol=0)
