"""One decode token's k experts in one compiled call (kernels' experts_ffn): the per-expert path's
bits at every precision it takes, and the same greedy tokens through the engine, resident or streamed."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from hetero.ops import experts, kernels
from hetero.ops.experts import ExpertBank

pytestmark = pytest.mark.skipif(kernels.get() is None, reason="compiled kernels unavailable")


def _per_expert(bank, x, index, weight):
    """The bank's grouped-by-expert loop, the one-token kernel switched off for this call."""
    bank._one_token = lambda *a: None
    try:
        return bank(x, index, weight)
    finally:
        del bank._one_token


@pytest.mark.parametrize("precision", ["int4", "int8", "q4_0", "q8_0", "q4_1"])
def test_one_token_kernel_gives_the_per_expert_bits(precision):
    g = torch.Generator().manual_seed(1)
    E, f, h, k = 6, 64, 128, 3
    gate, up = torch.randn(E, f, h, generator=g) / h ** .5, torch.randn(E, f, h, generator=g) / h ** .5
    down = torch.randn(E, h, f, generator=g) / f ** .5
    bank = ExpertBank(gate, up, down, E, precision, "cpu")
    for trial in range(3):
        x = torch.randn(1, h, generator=g).to(bank.dtype)
        index = torch.randperm(E, generator=g)[:k][None]       # router order, not sorted
        weight = torch.softmax(torch.randn(1, k, generator=g), -1)
        got = bank._one_token(x, index, weight)
        assert got is not None and torch.equal(bank(x, index, weight), got)
        want = _per_expert(bank, x, index, weight)
        assert got.dtype == want.dtype and got.shape == (1, h)
        assert torch.equal(got, want), (precision, trial, (got.float() - want.float()).abs().max())

@pytest.mark.parametrize("precision", ["int4", "int8", "q4_0", "q8_0", "q4_1"])
def test_a_prompt_in_one_call_gives_each_token_its_one_token_bits(monkeypatch, precision):
    """Several tokens (a prompt) through experts_rows: each expert's weights read once for all of its
    tokens (1 to 9 of them here, so the row tiles and their remainders both run), each token exactly
    as the one-token kernel gives it, and within rounding of the per-expert loop's GEMMs."""
    g = torch.Generator().manual_seed(3)
    E, f, h, k, N = 6, 64, 128, 3, 17
    gate, up = torch.randn(E, f, h, generator=g) / h ** .5, torch.randn(E, f, h, generator=g) / h ** .5
    down = torch.randn(E, h, f, generator=g) / f ** .5
    bank = ExpertBank(gate, up, down, E, precision, "cpu")
    xs = torch.randn(N, h, generator=g).to(bank.dtype)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    w = torch.softmax(torch.randn(N, k, generator=g), -1)
    got = bank._rows(xs, idx, w)
    assert got is not None and got.dtype == xs.dtype and got.shape == (N, h)
    assert torch.equal(bank(xs, idx, w), got)
    for n in range(N):
        assert torch.equal(got[n:n + 1], bank._one_token(xs[n:n + 1], idx[n:n + 1], w[n:n + 1])), (precision, n)
    # experts with more tokens than GEMM_ROWS take a dequantised GEMM instead: other summation
    # order, within rounding
    monkeypatch.setattr(experts, "GEMM_ROWS", 8)
    counts = torch.bincount(idx.reshape(-1), minlength=E)
    assert (counts > 8).any() and ((counts > 0) & (counts <= 8)).any()
    mixed = bank._rows(xs, idx, w)
    torch.testing.assert_close(mixed.float(), got.float(), atol=3e-2, rtol=3e-2)
    bank._rows = lambda *a: None
    loop = bank(xs, idx, w)   # the per-expert loop: a GEMM per expert, other summation order
    torch.testing.assert_close(got.float(), loop.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("precision,renormalise", [("q4_0", True), ("int4", False)])
def test_routing_in_the_kernel_picks_torchs_experts_and_gives_their_bits(precision, renormalise):
    """ExpertsRouted: the router's softmax, top k and renormalisation in the compiled call choose the
    experts torch's route does (fp32 weights within a few ulps), and the experts' output is the
    one-token kernel's bits for the weights it chose."""
    from hetero.model.moe import route

    g = torch.Generator().manual_seed(4)
    E, f, h, k = 8, 64, 128, 3
    gate, up = torch.randn(E, f, h, generator=g) / h ** .5, torch.randn(E, f, h, generator=g) / h ** .5
    down = torch.randn(E, h, f, generator=g) / f ** .5
    bank = ExpertBank(gate, up, down, E, precision, "cpu")
    router = torch.randn(E, h, generator=g)
    assert bank.routed(torch.randn(1, h).to(bank.dtype), router, k, renormalise) is not None
    obj = experts._ROUTED[bank][1]
    for trial in range(8):
        x = torch.randn(1, h, generator=g).to(bank.dtype)
        w_t, i_t = route(torch.nn.functional.linear(x.float(), router), k, renormalise)
        ids, w = obj.route_only(x.reshape(-1).float().contiguous())
        assert ids.tolist() == i_t[0].tolist(), trial
        torch.testing.assert_close(w, w_t[0], atol=1e-6, rtol=1e-5)
        got = bank.routed(x, router, k, renormalise)
        assert torch.equal(got, bank._one_token(x, ids[None], w[None])), trial
    # another router (a new layer reusing the bank) rebinds; a streamed bank routes in torch
    assert bank.routed(x, router.clone(), k, renormalise) is not None and experts._ROUTED[bank][0] is not router
    bank.fetch = lambda e: None
    assert bank.routed(x, router, k, renormalise) is None


def test_a_bank_the_kernel_cannot_read_keeps_the_loop():
    g = torch.Generator().manual_seed(2)
    E, f, h = 4, 32, 64
    bank = ExpertBank(torch.randn(E, f, h, generator=g), torch.randn(E, f, h, generator=g),
                      torch.randn(E, h, f, generator=g), E, "fp32", "cpu")
    x, index, weight = torch.randn(1, h, generator=g), torch.tensor([[3, 1]]), torch.tensor([[0.7, 0.3]])
    assert bank._one_token(x, index, weight) is None      # fp32 weights: the dense GEMV, expert by expert
    assert bank.routed(x, torch.randn(E, h, generator=g), 2, True) is None   # nor does the routed call
    assert torch.equal(bank(x, index, weight), _per_expert(bank, x, index, weight))


@pytest.mark.parametrize("residency", ["resident", "disk"])
def test_engine_tokens_equal_with_and_without_the_grouped_kernel(monkeypatch, residency):
    """synthetic:tiny-moe at bf16 with int4 experts, resident or streamed through the expert cache:
    the same greedy tokens with the compiled kernels (one token's routing and experts, a prompt's)
    and with torch's routing and the per-expert loop."""
    import hetero
    from hetero.runtime.engine import Engine
    from tests.runtime_engine.helpers import uniform_plan

    spec = hetero.spec("synthetic:tiny-moe")
    plan = uniform_plan(spec, "bf16")
    plan = dataclasses.replace(plan, units=tuple(
        dataclasses.replace(u, precision="int4", residency=residency) if spec.is_experts_unit(u.name) else u
        for u in plan.units))
    used = []
    real = ExpertBank._one_token

    def counting(self, *a):
        y = real(self, *a)
        used.append(y is not None)
        return y

    monkeypatch.setattr(ExpertBank, "_one_token", counting)
    real_routed = ExpertBank.routed

    def counting_routed(self, *a):
        y = real_routed(self, *a)
        if a[0].shape[0] == 1:   # one decode token (streamed: routed in torch, then _one_token)
            used.append(y is not None or self.fetch is not None)
        return y

    monkeypatch.setattr(ExpertBank, "routed", counting_routed)
    prompt = []
    real_rows = ExpertBank._rows

    def counting_rows(self, *a):
        y = real_rows(self, *a)
        prompt.append(y is not None)
        return y

    monkeypatch.setattr(ExpertBank, "_rows", counting_rows)
    with Engine.load(plan, "synthetic:tiny-moe", progress=False) as e:
        fast = e.generate("hello there", max_new_tokens=8)
        if residency == "disk":   # each expert comes in one read (its slots are contiguous in the entry)
            streamed = e.model.net.layers[0].experts.fetch.__self__
            assert streamed.span and all(v is not None for v in streamed.span.values())
    assert used and all(used)                 # every decode token's experts took the kernel
    assert prompt and all(prompt)             # and the prompt's, experts_rows (one call per expert streamed)
    monkeypatch.setattr(ExpertBank, "_one_token", lambda self, *a: None)
    monkeypatch.setattr(ExpertBank, "_rows", lambda self, *a: None)
    monkeypatch.setattr(ExpertBank, "routed", lambda self, *a: None)
    with Engine.load(plan, "synthetic:tiny-moe", progress=False) as e:
        slow = e.generate("hello there", max_new_tokens=8)
    assert fast == slow


def test_moe_layer_fused_attention_follows_the_general_path():
    """A MoE layer's one-token step through the fused decode ops (q/k norms included) stays within
    bf16 rounding of the general torch path, and chooses the same tokens."""
    import hetero

    m = hetero.load("synthetic:tiny-moe", dtype="bf16")
    net = m.net
    layers = [layer for layer in net.layers if hasattr(layer, "_fused_attn")]
    assert layers and all(layer._fused_attn is not None and layer.q_norm is not None for layer in layers)

    def decode(fused: bool):
        for layer in layers:
            layer._use = layer._fused_attn
            if not fused:
                layer._fused_attn = None
        try:
            cache = net.new_cache(1, 16)
            net(torch.tensor([[1, 5, 9, 2]]), 0, cache)
            out, tok = [], 7
            for p in range(4, 10):
                logits = net(torch.tensor([[tok]]), p, cache)[0, -1].float()
                out.append(logits)
                tok = int(logits.argmax())
            return torch.stack(out)
        finally:
            for layer in layers:
                layer._fused_attn = layer._use
                del layer._use

    a, b = decode(True), decode(False)
    assert (a - b).abs().max() < 0.05 * b.abs().max()
    assert torch.equal(a.argmax(-1), b.argmax(-1))
