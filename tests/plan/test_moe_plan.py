"""MoE experts as their own planned units, on catalog hardware and a toy budget (the planner only:
nothing here builds a model)."""
from __future__ import annotations

import pytest

from hetero.hardware.catalog import resolve
from hetero.model.sources import resolve_spec
from hetero.plan import make_plan
from hetero.plan.explain import _name, _runs
from tests.plan.helpers import cpu_machine, cpu_profile

GB = 10**9
WIDE = ["q8_0", "int8", "bf16", "fp16"]   # no 4-bit grid: Qwen3-30B-A3B is then 30 GB, over a 24 GB card


def _split(plan):
    dense = [u for u in plan.units if u.name.startswith("layers.") and not u.name.endswith(".experts")]
    experts = [u for u in plan.units if u.name.endswith(".experts")]
    return dense, experts


@pytest.fixture(scope="module")
def qwen():
    return resolve_spec("synthetic:qwen3-30b-a3b")


def test_tiny_moe_units_split_in_spec_and_plan():
    spec = resolve_spec("synthetic:tiny-moe")
    names = spec.unit_names()
    assert names == ["embed", "layers.0", "layers.0.experts", "layers.1", "layers.1.experts", "head"]
    # every tensor belongs to exactly one unit: the stacked experts to the experts unit
    assert sum(spec.unit_bytes(u, "fp32") for u in names if u != "head") + spec.unit_bytes("head", "fp32") \
        - (spec.unit_bytes("embed", "fp32") if spec.tie_embeddings else 0) == spec.total_bytes("fp32")
    assert all(spec.is_expert_tensor(t.name) for t in spec.unit_tensors("layers.0.experts"))
    assert not any(spec.is_expert_tensor(t.name) for t in spec.unit_tensors("layers.0"))
    p = make_plan(spec, cpu_machine(), cpu_profile(), {}, precisions=["fp32"], explain=False)
    assert [u.name for u in p.units] == names
    # one decode step reads k of E experts: the experts unit's bytes are priced at that share
    e = next(u for u in p.units if u.name == "layers.0.experts")
    assert e.bytes == spec.unit_bytes("layers.0.experts", "fp32")


def test_a_tight_budget_sends_the_experts_to_disk_and_keeps_the_dense_part():
    spec = resolve_spec("synthetic:tiny-moe")
    free = make_plan(spec, cpu_machine(), cpu_profile(), {}, precisions=["fp32"], explain=False)
    experts = sum(spec.unit_bytes(u, "fp32") for u in spec.unit_names() if spec.is_experts_unit(u))
    budget = free.memory["cpu"] - experts // 2
    p = make_plan(spec, cpu_machine(), cpu_profile(), {"cpu": budget}, precisions=["fp32"], explain=False)
    dense, ex = _split(p)
    assert all(u.residency == "disk" for u in ex) and all(u.residency == "resident" for u in dense)
    assert p.memory["cpu"] <= budget
    # the RAM they take is the expert cache's floor (depth x k experts), not the unit
    per = spec.unit_bytes("layers.0.experts", "fp32") / spec.n_experts
    assert p.memory_breakdown["cpu"]["buffers"] == pytest.approx(2 * spec.experts_per_token * per, rel=0.01)


def test_qwen3_30b_on_a_24gb_card_keeps_experts_off_it_and_the_dense_part_on_it(qwen):
    hw = resolve("catalog:rtx4090+ram64g+nvme")
    p = make_plan(qwen, hw, None, {"cuda:0": 24 * GB}, precisions=WIDE, explain=False)
    dense, ex = _split(p)
    assert {u.device for u in dense} == {"cuda:0"}
    on_cpu = [u for u in ex if u.device == "cpu"]
    assert 0 < len(on_cpu) < len(ex) and p.memory["cuda:0"] <= 24 * GB
    # like experts go in one run (llama.cpp's --n-cpu-moe N shape), and explain folds them so
    idx = [qwen.layer_index(u.name) for u in on_cpu]
    assert idx == list(range(idx[0], idx[0] + len(idx)))
    rows = [_name(r) for r in _runs(p.units)]
    assert f"layers.{idx[0]}-{idx[-1]}.experts (x{len(idx)})" in rows and "layers.0-47 (x48)" in rows
    assert p.predicted.decode_tok_s > 0
    # 80 GB holds it all: everything on the GPU, and faster
    big = make_plan(qwen, hw, None, {"cuda:0": 80 * GB}, precisions=WIDE, explain=False)
    assert {u.device for u in big.units if u.name != "embed"} == {"cuda:0"}
    assert big.predicted.decode_tok_s > p.predicted.decode_tok_s


def test_qwen3_30b_at_4_bits_fits_a_24gb_card_whole(qwen):
    """At int4 the model is ~19 GB: nothing needs to leave the GPU (as users run Q4_K_M files)."""
    p = make_plan(qwen, resolve("catalog:rtx4090+ram64g+nvme"), None, {"cuda:0": 24 * GB}, explain=False)
    assert {u.device for u in p.units if u.name.startswith("layers.")} == {"cuda:0"}


def test_a_cpu_only_server_computes_experts_where_they_lie(qwen):
    p = make_plan(qwen, resolve("catalog:server+ram128g"), None, {}, precisions=["q8_0", "int8"], explain=False)
    dense, ex = _split(p)
    assert {(u.device, u.residency) for u in dense + ex} == {("cpu", "resident")}
    # decode reads k/E of the experts: far faster than reading every expert would allow
    whole = p.memory["cpu"] / (resolve("catalog:server+ram128g").device("cpu").bandwidth or 1)
    assert 1.0 / p.predicted.decode_tok_s < whole


def test_pipeline_stages_keep_a_moe_layer_with_its_experts():
    from hetero.dist.split import rank_speeds, split_model
    from hetero.dist.hosts import catalog_hosts

    spec = resolve_spec("synthetic:olmoe-1b-7b")
    h = catalog_hosts(["desktop", "desktop", "desktop"], "10gbe")
    for layers in (None, [5, 6, 5]):
        s = split_model(spec, h, rank_speeds(h), "bf16", layers=layers)
        for st in s.stages:
            dense = [u for u in st.units if u.startswith("layers.") and not spec.is_experts_unit(u)]
            assert [f"{u}.experts" for u in dense] == [u for u in st.units if spec.is_experts_unit(u)]
        assert sum(st.layers for st in s.stages) == spec.n_layers
        if layers:
            assert [st.layers for st in s.stages] == layers


def test_a_prefill_objective_moves_experts_to_the_gpu_where_decode_computes_them_in_ram(qwen):
    """4 GB of GPU: for decode the experts that do not fit are computed on the CPU where they lie; for
    time to first token a 512-token prefill touches every expert, and copying them over PCIe to the
    GPU beats CPU GEMMs, so they stream from RAM to the GPU. The notes say where and why."""
    hw = resolve("catalog:rtx4090+ram64g+nvme")
    budget, precs = {"cuda:0": 4 * GB}, ["q4_0", "int4"]
    dec = make_plan(qwen, hw, None, budget, precisions=precs)
    ttft = make_plan(qwen, hw, None, budget, precisions=precs, objective="ttft", explain=False)
    _, dx = _split(dec)
    _, tx = _split(ttft)
    assert sum(u.device == "cpu" for u in dx) > len(dx) // 2
    assert all(u.device == "cuda:0" for u in tx) and sum(u.residency == "ram" for u in tx) > len(tx) // 2
    assert ttft.predicted.ttft_s < dec.predicted.ttft_s and dec.predicted.decode_tok_s > ttft.predicted.decode_tok_s
    notes = " ".join(dec.why.notes)
    assert "routed experts (48 layers" in notes and "on cuda:0 from RAM" in notes and "resident on cuda:0" in notes
