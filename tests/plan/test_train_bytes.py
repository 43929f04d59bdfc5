"""plan/train_bytes.py's per-token byte counts against the ops a real layer runs: a dispatch mode
sees every aten op of one decoder layer's forward and backward (with and without its adapters) and
adds up what the eager ones read and write."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hetero
from hetero.finetune.lora import DEFAULT_TARGETS, LoraConfig, attach, layer_module, new_parts
from hetero.finetune.step import _layer
from hetero.plan import train_bytes as tb
from tests.model.helpers import write_tiny_checkpoint

GEMM = {"mm", "addmm", "bmm"}
# views, bare allocations, and attention (priced apart): no bytes of their own
NO_BYTES = {"view", "_unsafe_view", "t", "transpose", "as_strided", "slice", "split", "split_with_sizes", "expand",
            "unsqueeze", "permute", "detach", "alias", "select", "squeeze", "unbind", "reshape", "_reshape_alias",
            "empty", "empty_like", "empty_strided", "new_empty_strided", "lift_fresh",
            "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward"}
WRITE_ONLY = {"zeros", "zeros_like", "new_zeros", "full", "new_full", "ones_like"}  # allocations that are filled


class Count(TorchDispatchMode):
    """Eager bytes (inputs + outputs; in-place ops their operands) and rank-r product bytes."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank, self.eager, self.skinny = rank, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func).split(".")[1]  # aten.NAME.overload
        ins = [t for t in list(args) + list((kwargs or {}).values()) for t in (t if isinstance(t, (list, tuple)) else [t])
               if isinstance(t, torch.Tensor)]
        outs = [t for t in (out if isinstance(out, (list, tuple)) else [out]) if isinstance(t, torch.Tensor)]
        nb = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        if name in GEMM:
            if min(min(t.shape[-2:]) for t in ins[-2:]) <= self.rank:
                self.skinny += nb(ins) + nb(outs)
        elif name in WRITE_ONLY:
            self.eager += nb(outs)
        elif name not in NO_BYTES:
            self.eager += nb(ins) + (0 if name.endswith("_") else nb(outs))  # in place: its operands
        return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-gqa-bytes")
    write_tiny_checkpoint("mistral_gqa", d)
    return d


def _count(m, layer, rank, enabled):
    for fused in ("qkv", "o", "gate_up", "down"):
        getattr(layer, fused).enabled = enabled
    T = 16
    m.net._ensure_rope(T)
    x = torch.randn(2, T, m.spec.hidden_size).to(layer.dtype).requires_grad_(True)
    _layer(m.net, layer, x.detach())  # the rotary table for T is built (and cached) once, outside the count
    with Count(rank) as f:
        y = _layer(m.net, layer, x)
    with Count(rank) as b:
        y.backward(torch.ones_like(y))
    return f, b, 2 * T


@pytest.mark.parametrize("dtype,targets", [("bf16", DEFAULT_TARGETS), ("fp32", DEFAULT_TARGETS),
                                           ("bf16", ("q_proj", "v_proj", "up_proj"))])
def test_formulas_match_the_ops_a_layer_runs(tiny_dir, dtype, targets):
    m = hetero.load(str(tiny_dir), dtype=dtype)
    cfg = LoraConfig(rank=4, alpha=8, targets=targets)
    attach(m.net, m.spec, cfg, new_parts(m.spec, cfg, 0))
    layer = layer_module(m.net.layers[0])
    a = torch.empty(0, dtype=layer.dtype).element_size()
    f0, b0, n = _count(m, layer, cfg.rank, False)
    f1, b1, _ = _count(m, layer, cfg.rank, True)
    assert tb.base_forward(m.spec, a) == pytest.approx(f0.eager / n, rel=0.1)
    assert tb.base_backward(m.spec, a) == pytest.approx(b0.eager / n, rel=0.15)
    side = tb.side_path(m.spec, targets, cfg.rank, a)
    assert side["forward"] == pytest.approx((f1.eager - f0.eager) / n, rel=0.1)
    assert side["backward"] == pytest.approx((b1.eager - b0.eager) / n, rel=0.15)
    assert side["skinny_forward"] == pytest.approx(f1.skinny / n, rel=0.15)
    assert side["skinny_backward"] == pytest.approx(b1.skinny / n, rel=0.15)
    assert f0.skinny == b0.skinny == 0  # without adapters nothing is rank-r
