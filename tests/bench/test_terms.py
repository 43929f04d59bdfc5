"""The printed term breakdown adds up to the plan's own per-unit predictions."""
from __future__ import annotations

import pytest

from benchhelpers import machine, profile
from hetero.bench.run import config_plan
from hetero.bench.terms import terms
from hetero.model.sources import resolve_spec


@pytest.mark.parametrize("precision", ["bf16", "int4"])
def test_terms_add_up_to_the_plans_unit_times(precision):
    spec = resolve_spec("synthetic:tiny")
    prof = profile({"attn_rate@cpu": 0.2})
    plan = config_plan(spec, machine(), prof, precision, "resident", 48, 96)
    t = terms(plan, spec, machine(), prof)
    assert set(t) == {"layers.0", "head"}
    units = {u.name: u for u in plan.units}
    for name, row in t.items():
        for phase, want in (("decode", units[name].predicted_ms), ("prefill", units[name].prefill_ms)):
            p = row[phase]
            assert max(p["gemm"], p["memory"]) + p["attention"] + p["dequant"] + p["overhead"] == \
                pytest.approx(want, rel=1e-6, abs=2e-6)  # the plan keeps ms to 6 places
    pre = t["layers.0"]["prefill"]
    assert pre["attention"] > 0 and t["layers.0"]["decode"]["attention"] == 0
    assert (pre["dequant"] > 0) == (precision == "int4")  # int4 prefill dequantises (its probe is below bf16's)
