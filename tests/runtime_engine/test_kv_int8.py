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


def test_int8_kv_decodes_layer_by_layer_and_keeps_each_step_close(tiny):
    # prefill then one-token steps: the step path (no compiled stack for a quantised cache) reads
    # back what the prefill wrote
    prompt = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    steps = {}
    for kd in ("auto", "int8"):
        tiny.kv_dtype = kd
        cache = tiny.new_cache(1, 24)
        assert cache.plain == (kd == "auto")
        out = [tiny(prompt, 0, cache)]
        for i in range(3):
            out.append(tiny(prompt[:, i:i + 1], 20 + i, cache))
        steps[kd] = torch.stack(out)
    tiny.kv_dtype = "auto"
    scale = float(steps["auto"].abs().max())
    assert float((steps["int8"] - steps["auto"]).abs().max()) <= 0.02 * scale


def test_greedy_tokens_equal_on_the_built_in_model():
    # the built-in model (its Q4_1 file, native): int8 KV gives the bf16 cache's greedy tokens here
    m = hetero.load("smollm2-135m", dtype="native")
    prompt = m.tokenizer.encode("The capital of France is Paris. The capital of Germany is")
    assert _greedy(m.net, prompt, 12, "int8") == _greedy(m.net, prompt, 12, "auto")


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
