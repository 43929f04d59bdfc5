"""The shipped SmolLM2 sensitivity table drives the planner: a tighter quality bound under a tight
memory budget moves units to higher precision."""
from __future__ import annotations

import pytest

from hetero.compress.sensitivity import builtin_table
from hetero.plan import make_plan
from hetero.plan.sensitivity import load_sensitivity
from tests.plan.helpers import cpu_machine, cpu_profile

BITS = {"fp32": 32, "bf16": 16, "fp16": 16, "int8": 8, "int4": 4}


@pytest.mark.skipif(builtin_table("smollm2-135m") is None, reason="table not measured yet")
def test_tightening_max_quality_loss_raises_precision_on_smollm2():
    import hetero

    spec = hetero.spec("smollm2-135m")
    table = load_sensitivity(builtin_table("smollm2-135m"))
    assert {(u, p) for u in spec.unit_names()[1:] for p in ("int8", "int4")} <= set(table)
    # Memory for about half the model at bf16: most units must be int8 or int4.
    budget = {"cpu": int(spec.total_bytes("int8") * 1.05), "disk": 0}
    precs = ["bf16", "int8", "int4"]
    kw = dict(memory=budget, precisions=precs, sensitivity=table, explain=False, prompt_tokens=64, context=128)
    loose = make_plan(spec, cpu_machine(), cpu_profile(), **kw)
    total_int4 = sum(c for (u, p), c in table.items() if p == "int4")
    tight = make_plan(spec, cpu_machine(), cpu_profile(), max_quality_loss=0.3 * total_int4, **kw)
    bits = lambda plan: sum(BITS[u.precision] for u in plan.units)  # noqa: E731
    assert tight.predicted.quality_loss <= 0.3 * total_int4 + 1e-12
    assert tight.predicted.quality_loss < loose.predicted.quality_loss
    assert bits(tight) > bits(loose)
