"""Per-token int8 activations (ops/actquant.py): the grid, the exact int8 x int8 product, and the
option applied to a real model's forward (prefill only, removed on exit)."""
from __future__ import annotations

import json

import pytest
import torch

import hetero
from hetero.ops.actquant import act_int8, fake_quant, int8_mm, quantize_per_token
from hetero.ops.linear import Int8Linear
from tests.cli import run_cli


def test_per_token_grid_keeps_each_token_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 96, generator=g) * torch.tensor([0.01, 0.1, 1, 10, 100, 1000])[:, None]
    q, s = quantize_per_token(x)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert torch.allclose(s, x.abs().amax(-1) / 127)
    assert (q.abs().amax(-1) == 127).all()          # each token's largest element sits on the grid's end
    err = (q.float() * s[:, None] - x).abs()
    assert (err <= s[:, None] / 2 * (1 + 1e-5)).all()
    assert torch.equal(fake_quant(x), q.float() * s[:, None])


def test_int8_mm_is_the_exact_product_of_the_int8_operands():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(33, 64, generator=g)
    w = torch.randint(-127, 128, (40, 64), generator=g, dtype=torch.int8)
    ws = torch.rand(40, generator=g) + 0.1
    q, s = quantize_per_token(x)
    ref = (q.double() @ w.double().t()) * s.double()[:, None] * ws.double()[None, :]
    assert torch.allclose(int8_mm(x, w, ws).double(), ref, rtol=1e-6, atol=1e-9)


def test_int8_linear_under_act_int8_matches_the_quantised_reference():
    g = torch.Generator().manual_seed(2)
    lin = Int8Linear(torch.randn(48, 72, generator=g), None)  # K=72 is padded to 80 inside
    x = torch.randn(5, 72, generator=g).to(torch.bfloat16)
    w = lin.qweight[:, :72].double() * lin.scales.double()[:, None]
    ref = fake_quant(x.float()).double() @ w.t()
    plain = lin(x)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin
    with act_int8(Net()) as n:
        assert n == 1
        y = lin(x)
    assert torch.allclose(y.double(), ref, rtol=1e-2, atol=1e-2)   # bf16 output rounding only
    assert not torch.equal(y, plain)                               # the activations did change
    assert torch.equal(lin(x), plain)                              # and nothing is left behind


@pytest.mark.parametrize("dtype", ["int8", "bf16"])
def test_act_int8_moves_prefill_logits_a_little_and_leaves_decode_alone(dtype):
    m = hetero.load("synthetic:tiny", dtype=dtype, threads=1)
    net = m.net
    ids = torch.randint(10, net.spec.vocab_size, (1, 24), generator=torch.Generator().manual_seed(3))

    def prefill():
        return net(ids, 0, net.new_cache(1, 32), last_only=False)

    base = prefill()
    with act_int8(net, head=True) as n:
        assert n == 4 * len(net.layers) + 1                        # q/k/v, o, gate/up, down per layer; head
    with act_int8(net) as n:
        assert n == 4 * len(net.layers)                            # a generation's prefill: the layers only
        q = prefill()
        cache = net.new_cache(1, 32)
        net(ids[:, :23], 0, cache)
        step_q = net(ids[:, 23:], 23, cache)
    cache = net.new_cache(1, 32)
    net(ids[:, :23], 0, cache)
    step = net(ids[:, 23:], 23, cache)
    rel = (q - base).norm() / base.norm()
    assert 0 < rel < 0.05
    assert torch.equal(prefill(), base)
    # the decode step itself is not quantised: it differs only through the quantised prefill's cache
    assert not torch.equal(step_q, q[:, -1])


def test_eval_cli_act_int8(tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text("The quick brown fox jumps over the lazy dog. " * 6)
    args = ["eval", "synthetic:tiny", "--text", str(f), "--context", "64", "--threads", "1", "--dtype", "int8",
            "--json", "--no-progress"]
    code, out, _ = run_cli(args, capsys)
    code_q, out_q, _ = run_cli(args + ["--act-int8"], capsys)
    assert code == code_q == 0
    a, b = json.loads(out), json.loads(out_q)
    assert a["activations"] == "default" and b["activations"] == "int8/token"
    assert a["tokens"] == b["tokens"]
    assert b["perplexity"] != a["perplexity"] and abs(b["perplexity"] / a["perplexity"] - 1) < 0.05


def test_grouped_grid_is_finer_than_one_scale_per_token():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 128, generator=g)
    x[:, 5] *= 50                                   # an outlier channel, as real activations have
    grouped = fake_quant(x, 32)
    blocks = x.reshape(8, 4, 32)
    step = blocks.abs().amax(-1, keepdim=True) / 127
    assert ((grouped.reshape(8, 4, 32) - blocks).abs() <= step / 2 * (1 + 1e-5)).all()
    assert (grouped - x).norm() < 0.75 * (fake_quant(x) - x).norm()


def test_eval_cli_act_group_needs_act_int8(capsys):
    code, _, err = run_cli(["eval", "synthetic:tiny", "--tokens", "200", "--act-group", "32"], capsys)
    assert code == 2 and "--act-group" in err and err.count("\n") == 1
