"""AWQ: the searched channel scales lower a layer's output error against round to nearest where a
few input channels carry large activations, and folding them leaves the float model unchanged."""
from __future__ import annotations

import torch

from hetero.compress.awq import output_error, scale_model, search
from hetero.compress.core import build_net, load_model
from hetero.compress.grid import quantize
from hetero.compress.methods import Options, calibration


def test_awq_scales_lower_the_layer_output_error_with_outlier_channels():
    g = torch.Generator().manual_seed(0)
    k, n = 256, 64
    x = torch.randn(4096, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:8]] *= 25.0  # a few salient input channels
    w = torch.randn(n, k, generator=g) * 0.05
    h = x.T @ x / x.shape[0]
    s, alpha, err, rtn_err = search([w], x.abs().mean(0), h, 32, sym=False)
    assert rtn_err == output_error(w, quantize(w, 32).dequantize(), h)  # alpha = 0 is plain RTN
    assert alpha > 0 and err < 0.7 * rtn_err
    # measured on the tokens themselves, not only through the Gram matrix
    wq = quantize(w * s, 32).dequantize() / s
    assert ((x @ (w - wq).T) ** 2).mean() < 0.7 * ((x @ (w - quantize(w, 32).dequantize()).T) ** 2).mean()


def test_folding_the_scales_keeps_the_float_model():
    tiny = load_model("synthetic:tiny32")
    grams = calibration(tiny, Options(calib_tokens=256, progress=False))
    scaled, col, summary = scale_model(tiny, grams, 32, False, alphas=10)
    assert summary["calib_output_error_vs_rtn"] <= 1.0
    moved = [n for n in scaled if not torch.equal(scaled[n], tiny.tensors[n])]
    assert "model.layers.0.input_layernorm.weight" in moved and "model.layers.1.self_attn.v_proj.weight" in moved
    ids = torch.randint(0, 512, (1, 48), generator=torch.Generator().manual_seed(1))

    def logits(t):
        net = build_net(tiny.spec, t)
        return net(ids, 0, net.new_cache(1, 48), last_only=False)

    torch.testing.assert_close(logits(scaled), logits(tiny.tensors), rtol=1e-4, atol=1e-4)
