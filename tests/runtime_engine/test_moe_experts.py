"""MoE experts units run at their own precision and residency: left on disk they stream through the
LRU expert cache with the same greedy tokens as all in RAM (synthetic:tiny-moe, a few hundred KB)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import hetero
from hetero.runtime.engine import Engine
from hetero.runtime.experts import ExpertCache
from tests.runtime_engine.helpers import uniform_plan

MODEL = "synthetic:tiny-moe"
PROMPT = "hello there"


@pytest.fixture(scope="module")
def spec():
    return hetero.spec(MODEL)


def _with(plan, spec, **change):
    """`plan` with every experts unit changed (precision=..., residency=...)."""
    units = tuple(dataclasses.replace(u, **change) if spec.is_experts_unit(u.name) else u for u in plan.units)
    return dataclasses.replace(plan, units=units)


def _run(plan, n=8):
    with Engine.load(plan, MODEL, progress=False) as e:
        return e.generate(PROMPT, max_new_tokens=n), e.report(), e


def test_experts_on_disk_give_the_in_ram_tokens_through_the_cache(spec):
    want, _, _ = _run(uniform_plan(spec, "fp32"))
    got, rep, eng = _run(_with(uniform_plan(spec, "fp32"), spec, residency="disk"))
    assert got == want
    cache = next(s for s in rep["streaming"] if s.get("kind") == "expert_cache")
    # no budget: the cache holds its floor, depth 2 x k experts, of the 16 streamed
    assert cache["capacity_experts"] == 2 * spec.experts_per_token
    assert cache["held_experts"] <= cache["capacity_experts"] and cache["evictions"] > 0
    assert cache["misses"] > 0 and cache["hits"] + cache["misses"] > cache["capacity_experts"]
    # every miss read one expert (its gate/up and down slots), nothing else
    bank = eng.model.net.layers[0].experts
    assert bank.fetch is not None
    per = eng.prefetchers[-1].slot_bytes
    assert cache["read_bytes"] == cache["misses"] * per


def test_experts_at_their_own_precision_resident_or_on_disk(spec):
    """bf16 layers with int8 experts: resident and streamed agree, and the experts run int8 linears."""
    base = _with(uniform_plan(spec, "bf16"), spec, precision="int8")
    want, _, eng = _run(base, 6)
    assert type(eng.model.net.layers[0].experts.gate_up0).__name__ != type(eng.model.net.layers[0].qkv).__name__
    got, _, _ = _run(_with(base, spec, residency="disk"), 6)
    assert got == want


def test_a_budget_with_headroom_grows_the_cache_and_its_hit_rate(spec):
    plan = _with(uniform_plan(spec, "fp32"), spec, residency="disk")
    _, small, _ = _run(plan)
    per = spec.unit_bytes("layers.0.experts", "fp32") // spec.n_experts
    roomy = dataclasses.replace(plan, budgets={"cpu": 10**9}, memory={"cpu": 10**9 - 100 * per})
    got, big, _ = _run(roomy)
    s, b = (next(x for x in r["streaming"] if x.get("kind") == "expert_cache") for r in (small, big))
    assert b["capacity_experts"] == 2 * spec.n_experts   # room for all: capped at the experts streamed
    assert b["evictions"] == 0 and b["misses"] <= 2 * spec.n_experts and b["hit_rate"] > s["hit_rate"]


def test_the_lru_cache_counts_hits_misses_and_evicts_the_oldest():
    cache = ExpertCache(capacity=2, slot_bytes=4096)
    loads, evicted = [], []

    def get(key):
        def load(buf):
            loads.append(key)
            buf.tensor[:1] = key   # the buffer really is the expert's
            return 4096
        return cache.get(key, load, lambda: evicted.append(key))

    a = get(1)
    get(2)
    assert get(1) is a and int(a.tensor[0]) == 1     # a hit: same buffer, no load
    get(3)                                             # full: 2 is the least recently used
    assert evicted == [2] and loads == [1, 2, 3]
    get(2)                                             # 1 is now the oldest
    assert evicted == [2, 1]
    assert (cache.hits, cache.misses, cache.evictions, cache.read_bytes) == (1, 4, 2, 4 * 4096)
    assert cache.hit_rate == pytest.approx(0.2) and cache.allocated == 2


def test_a_planned_budget_that_forces_experts_to_disk_runs_with_the_in_ram_tokens(spec):
    from hetero.plan import make_plan
    from tests.plan.helpers import cpu_machine, cpu_profile

    free = make_plan(spec, cpu_machine(), cpu_profile(), {}, precisions=["fp32"], explain=False)
    experts = sum(spec.unit_bytes(u, "fp32") for u in spec.unit_names() if spec.is_experts_unit(u))
    tight = make_plan(spec, cpu_machine(), cpu_profile(), {"cpu": free.memory["cpu"] - experts // 2},
                      precisions=["fp32"], explain=False)
    assert {u.residency for u in tight.units if spec.is_experts_unit(u.name)} == {"disk"}
    want, _, _ = _run(free)
    got, rep, _ = _run(tight)
    assert got == want and any(s.get("kind") == "expert_cache" and s["misses"] > 0 for s in rep["streaming"])


def test_experts_in_ram_for_a_gpu_copy_only_the_experts_a_pass_uses(spec):
    """cuda:0 layers with experts kept in pinned RAM (CUDA paths on CPU tensors when no GPU is here):
    the CPU run's tokens, and a pass moves experts, not whole units."""
    import contextlib

    from hetero.runtime import devices

    want, _, _ = _run(uniform_plan(spec, "fp32"))
    gpu = _with(uniform_plan(spec, "fp32", device="cuda:0"), spec, residency="ram")
    with devices.simulated_cuda() if not torch.cuda.is_available() else contextlib.nullcontext():
        got, rep, eng = _run(gpu)
    assert got == want
    cache = next(s for s in rep["streaming"] if s.get("kind") == "expert_cache")
    assert cache["tier"] == "ram" and cache["misses"] > 0 and cache["hits"] > 0
    per = spec.unit_bytes("layers.0.experts", "fp32") // spec.n_experts
    assert cache["read_bytes"] == cache["misses"] * per    # expert by expert, never a whole unit
    assert not [s for s in rep["streaming"] if s.get("kind") != "expert_cache"]   # no unit prefetcher


def test_get_many_reads_misses_together_and_counts_as_one_by_one():
    """A layer's k experts at once: hits move to the end first (never evicted by this call's misses),
    the misses' reads run on the reader threads, each is bound in order, and the counts are what
    get() one key at a time would give."""
    import threading

    cache = ExpertCache(capacity=4, slot_bytes=4096)
    readers, bound, evicted = set(), [], []

    def read(key, buf):
        readers.add(threading.current_thread().name)
        buf.tensor[:1] = key
        return 4096

    def many(keys):
        cache.get_many(keys, read, lambda k, b: bound.append((k, int(b.tensor[0]))), evicted.append)

    many([1, 2, 3])
    assert bound == [(1, 1), (2, 2), (3, 3)] and any(n.startswith("expert-read") for n in readers)
    many([3, 4, 5])             # 3 hits; room for one more, then 1 (the oldest) goes, not 3
    assert evicted == [1] and bound[-2:] == [(4, 4), (5, 5)]
    assert (cache.hits, cache.misses, cache.evictions, cache.read_bytes) == (1, 5, 1, 5 * 4096)
    assert set(k for k in cache.held) == {2, 3, 4, 5} and cache.allocated == 4
    many([5, 5])                # a repeated key is one hit each, no read
    assert cache.misses == 5 and cache.hits == 3
    cache.close()
