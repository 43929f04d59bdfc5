"""Safety: whatever the model and budgets, no plan is over any budget; an impossible request names
the smallest budget (or quality bound) that would work, and that one does work."""
from __future__ import annotations

import re

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hetero import cost
from hetero.errors import HeteroError
from hetero.plan import make_plan
from tests.plan.helpers import cpu_machine, cpu_profile, gpu_machine, toy_spec


def recount(plan, spec, hw) -> dict[str, int]:
    """Memory per device from the plan's units alone, by the rules the plan promises."""
    P, C, B, depth = plan.prompt_tokens, plan.context, plan.batch, plan.prefetch_depth
    shared = {d.name: (d.shares_memory_with or d.name) for d in hw.devices}
    mem = {m: 0 for m in plan.memory}
    pools: dict[str, int] = {}
    for u in plan.units:
        held = 0 if (spec.tie_embeddings and u.name == "embed") else u.bytes
        home = shared[u.device]
        mem[{"resident": home, "ram": "cpu", "disk": "disk"}[u.residency]] += held
        mem[home] += cost.kv_bytes(spec, u.name, u.precision, C, B)
        if u.residency != "resident":
            buf = int(depth * cost.read_bytes(spec, u.name, u.bytes, B * P))
            for pool in {"cpu" if u.residency == "disk" else home, home}:
                pools[pool] = max(pools.get(pool, 0), buf)
    for m, b in pools.items():
        mem[m] += b
    kinds = {d.name: d.kind for d in hw.devices}
    for d in {u.device for u in plan.units}:  # a CPU offered int4 holds int4 prefill's dequantised block
        mem[shared[d]] += cost.workspace_bytes(spec, P, B, dequant=kinds[d] == "cpu" and "int4" in plan.precisions)
    return mem


@st.composite
def requests(draw):
    hidden = draw(st.sampled_from([32, 64, 128]))
    heads = draw(st.sampled_from([2, 4]))
    spec = toy_spec(layers=draw(st.integers(1, 5)), hidden=hidden, ffn=draw(st.sampled_from([64, 96, 256])),
                    heads=heads, kv_heads=draw(st.sampled_from([1, heads])),
                    vocab=draw(st.sampled_from([128, 512])), tied=draw(st.booleans()))
    kind = draw(st.sampled_from(["cpu", "gpu", "2gpu"]))
    hw, prof = (cpu_machine(), cpu_profile()) if kind == "cpu" else (gpu_machine(gpus=1 + (kind == "2gpu")), None)
    size = spec.total_bytes("bf16")
    budgets = {d.name: int(draw(st.floats(0.0, 1.6)) * size) for d in hw.devices}
    precs = draw(st.lists(st.sampled_from(["fp32", "bf16", "int8", "int4"]), min_size=1, max_size=3, unique=True))
    quality = draw(st.one_of(st.none(), st.floats(0.0, 0.04)))
    objective = draw(st.sampled_from(["decode", "ttft", "throughput"]))
    return spec, hw, prof, budgets, precs, quality, objective


def plan(spec, hw, prof, budgets, precs, quality, objective):
    return make_plan(spec, hw, prof, budgets, objective=objective, prompt_tokens=16, context=40,
                     max_quality_loss=quality, precisions=precs, explain=False)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_no_plan_over_any_budget(req):
    spec, hw, prof, budgets, precs, quality, objective = req
    try:
        p = plan(*req)
    except HeteroError as e:
        msg = str(e)
        m = re.search(r"smallest max-quality-loss that works is ([0-9.e+-]+)", msg)
        if m:
            event("infeasible: quality")
            p = plan(spec, hw, prof, budgets, precs, float(m.group(1)), objective)
            assert p.predicted.quality_loss <= float(m.group(1)) + 1e-12
            return
        fixes = re.findall(r"(\S+)=[0-9.]+ [KMGT]?B \((\d+) B; have", msg)
        assert fixes or "raising any single one is not enough" in msg, msg
        event(f"infeasible: {len(fixes)} single-budget fixes")
        for dev, need in fixes:  # each named budget works on its own
            p = plan(spec, hw, prof, {**budgets, dev: int(need)}, precs, quality, objective)
            assert p.memory[dev] <= int(need)
            assert not p.over_budget()
        return
    event("feasible")
    assert not p.over_budget()
    assert recount(p, spec, hw) == p.memory
    for dev, b in budgets.items():
        assert p.memory.get(dev, 0) <= b
    if quality is not None:
        assert p.predicted.quality_loss <= quality + 1e-12
    assert {u.precision for u in p.units} <= set(precs)
