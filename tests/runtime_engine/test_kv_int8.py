"""int8 KV (--kv-dtype int8): logits as close to the exact cache as bf16 KV's within the int8 grid's
error, greedy tokens unchanged on the built-in model, and a KV budget that holds ~2x the tokens,
for the pool (batches) and for the planner."""
from __future__ import annotations

import pytest
import torch

import hetero
from hetero.errors import HeteroError
from hetero.runtime.batch import BatchRunner
from hetero.runtime.generate import generate_step
from hetero.runtime.kvcache import KVPool
from hetero.runtime.sampling import Sampler, SamplingParams


@pytest.fixture(scope="module")
def tiny():
    return hetero.load("synthetic:tiny", dtype="fp32").net


def _logits(net, ids, kv_dtype):
    net.kv_dtype = kv_dtype
    try:
        return net(ids, 0, net.new_cache(1, ids.shape[1]), last_only=False)
    finally:
        net.kv_dtype = "auto"


def _greedy(net, prompt, n, kv_dtype):
    net.kv_dtype = kv_dtype
    try:
        return [t for t, _ in generate_step(net, prompt, n, Sampler(SamplingParams()), set())]
    finally:
        net.kv_dtype = "auto"


def test_int8_kv_logits_are_within_a_few_bf16_roundings_of_the_exact_cache(tiny):
    # fp32 layers, so the fp32 ("auto") cache is exact. A bf16 cache rounds each value to 2^-9 of
    # itself; int8 rounds to 1/254 of its row's absmax, 2-4x more on typical rows (the smaller
    # values of a row lose more), so the int8 error is bounded by 4x bf16's, both far below the
    # logits' scale, and the argmax never moves.
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(0))
    exact, b16, i8 = (_logits(tiny, ids, kd) for kd in ("auto", "bf16", "int8"))
    e16, e8 = float((b16 - exact).abs().max()), float((i8 - exact).abs().max())
    assert 0 < e16 and 0 < e8 <= 4 * e16
    assert e8 <= 0.02 * float(exact.abs().max())
    assert torch.equal(i8.argmax(-1), exact.argmax(-1))


@pytest.mark.parametrize("dtype", ["fp32", "int8"])   # int8 weights: bf16 activations
def test_the_compiled_stack_reads_int8_kv_as_the_layers_do(dtype, monkeypatch):
    from hetero.model.llama import DecoderLayer
    from hetero.ops import kernels

    if kernels.get() is None or not hasattr(kernels.get().DecodeStack, "step_q8"):
        pytest.skip("compiled kernels (with the int8 KV step) unavailable here")
    net = hetero.load("synthetic:tiny", dtype=dtype).net
    net.kv_dtype = "int8"
    prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    calls = []
    forward = DecoderLayer.forward
    monkeypatch.setattr(DecoderLayer, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    runs = {}
    for stacked in (False, True):
        net.stack_decode = stacked
        cache = net.new_cache(1, 14)
        assert cache.kind == "int8"
        steps = [net(prompt, 0, cache)]
        calls.clear()
        for i in range(5):
            steps.append(net(prompt[:, i:i + 1], 9 + i, cache))
        runs[stacked] = (torch.stack(steps), calls[:], cache)
    assert runs[True][1] == [] and len(runs[False][1]) == 5 * len(net.layers)  # the stack ran every step
    # the same quantiser and rounding points as the torch path: the codes written agree (a code may
    # move by one where fp32 summation order puts a value on a rounding edge), the logits within
    # fp32 summation order, or under one bf16 step
    for a, b in zip(runs[True][2].k + runs[True][2].v, runs[False][2].k + runs[False][2].v):
        assert int((a.codes.int() - b.codes.int()).abs().max()) <= 1
    tol = 1e-4 if dtype == "fp32" else 2e-2
    torch.testing.assert_close(runs[True][0], runs[False][0], atol=tol, rtol=0)


def test_a_cast_cache_runs_layer_by_layer(tiny):
    tiny.kv_dtype = "bf16"
    try:
        cache = tiny.new_cache(1, 4)
    finally:
        tiny.kv_dtype = "auto"
    assert cache.kind == "cast" and cache.nbytes() == 2 * len(tiny.layers) * 4 * tiny.spec.kv_dim * 2


def test_greedy_tokens_equal_on_the_built_in_model():
    # the built-in model (its Q4_1 file, native): int8 KV gives the bf16 cache's greedy tokens here
    m = hetero.load("smollm2-135m", dtype="native")
    prompt = m.tokenizer.encode("The capital of France is Paris. The capital of Germany is")
    assert _greedy(m.net, prompt, 8, "int8") == _greedy(m.net, prompt, 8, "auto")


def test_a_kv_budget_holds_about_twice_the_blocks_in_int8(tiny):
    budget = 1 << 20
    b16 = KVPool(tiny, budget_bytes=budget, kv_dtype="bf16")
    i8 = KVPool(tiny, budget_bytes=budget, kv_dtype="int8")
    # head_dim 16: int8 costs 16 + 2 bytes a (token, head) against bf16's 32
    assert i8.n_blocks == budget // i8.block_bytes and i8.n_blocks >= 1.75 * b16.n_blocks
    assert i8.nbytes() <= budget and b16.nbytes() <= budget
    with pytest.raises(HeteroError, match="KV dtype"):
        KVPool(tiny, budget_bytes=budget, kv_dtype="int3")


def test_a_request_the_bf16_pool_refuses_runs_in_the_int8_pool_as_it_does_alone(tiny):
    prompt = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    n = 8
    need = KVPool(tiny, n_blocks=1, kv_dtype="bf16").block_bytes * -(-(len(prompt) + n) // 16)
    budget = int(need * 0.75)                      # 3/4 of what bf16 needs: int8 fits (~0.56)
    with pytest.raises(HeteroError, match="KV blocks"):
        BatchRunner(tiny, pool=KVPool(tiny, budget_bytes=budget, kv_dtype="bf16")).add(prompt, n)
    runner = BatchRunner(tiny, pool=KVPool(tiny, budget_bytes=budget, kv_dtype="int8"))
    rid = runner.add(prompt, n)
    assert runner.run()[rid] == _greedy(tiny, prompt, n, "int8")
