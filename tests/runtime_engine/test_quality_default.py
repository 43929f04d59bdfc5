"""Without --precisions or a bound, a run's plan keeps quality within the default budget (+1%
perplexity), priced by the model's shipped sensitivity table where it has one; memory too small for
that budget drops it with a note rather than failing."""
from __future__ import annotations

import pytest

from hetero.errors import HeteroError
from hetero.hardware.catalog import resolve
from hetero.model.sources import resolve_spec
from hetero.plan.sensitivity import DEFAULT_MAX_QUALITY_LOSS, shipped_sensitivity
from hetero.runtime import engine

MODEL = "synthetic:llama-1b"


@pytest.fixture
def catalog_cpu(monkeypatch):
    hw = resolve("catalog:server")   # a spec-sheet CPU server: no micro-benchmarks in a test
    monkeypatch.setattr("hetero.hardware.machine", lambda name: (hw, None))
    monkeypatch.setattr(engine.baseline, "runtime_baseline", lambda model=None: 300 << 20)
    monkeypatch.setattr("hetero.runtime.firstuse.prepare", lambda model: None)
    return hw


def test_default_plan_keeps_the_default_quality_bound(catalog_cpu):
    plan, notes = engine.plan_for_run(MODEL, memory_text="cpu=64GB")
    unbounded, _ = engine.plan_for_run(MODEL, memory_text="cpu=64GB", max_quality_loss=1.0)
    assert plan.max_quality_loss == DEFAULT_MAX_QUALITY_LOSS and not notes
    assert plan.predicted.quality_loss <= DEFAULT_MAX_QUALITY_LOSS + 1e-9
    # the bound costs something here: without it the planner goes narrower (faster, lossier)
    assert unbounded.predicted.quality_loss > DEFAULT_MAX_QUALITY_LOSS
    assert unbounded.predicted.decode_tok_s > plan.predicted.decode_tok_s


def test_explicit_precisions_are_not_bounded(catalog_cpu):
    plan, _ = engine.plan_for_run(MODEL, memory_text="cpu=64GB", precisions=["int4"])
    assert {u.precision for u in plan.units} == {"int4"} and plan.max_quality_loss is None


def test_a_budget_too_small_for_the_bound_plans_without_it(catalog_cpu, monkeypatch):
    from hetero import plan as planmod

    calls = []

    def tight(*a, max_quality_loss=None, **kw):   # as if memory left no plan within the bound
        calls.append(max_quality_loss)
        if max_quality_loss is not None:
            raise HeteroError("no plan keeps the quality loss within 0.01")
        return orig(*a, **kw)

    orig = planmod.make_plan
    monkeypatch.setattr(planmod, "make_plan", tight)
    plan, notes = engine.plan_for_run(MODEL, memory_text="cpu=64GB")
    assert calls == [DEFAULT_MAX_QUALITY_LOSS, None]
    assert any("default" in n and "--max-quality-loss" in n for n in notes)


def test_the_builtin_model_ships_a_table_for_its_own_shapes():
    spec = resolve_spec("smollm2-135m")
    table = shipped_sensitivity(spec)
    assert table is not None and ("head", "int4") in table
    # its head is the sensitive unit: int4 there costs more than int4 in any one decoder layer
    layer_max = max(c for (u, p), c in table.items() if p == "int4" and u.startswith("layers."))
    assert table[("head", "int4")] > 10 * layer_max
    assert shipped_sensitivity(resolve_spec("synthetic:llama-1b")) is None
