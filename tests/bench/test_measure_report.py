"""A real (tiny) measurement, predicted vs measured, and the rendered report."""
from __future__ import annotations

import pytest

from benchhelpers import machine, profile
from hetero.bench.measure import compare, predicted_of, rel_error


@pytest.fixture(scope="module")
def measured():
    from hetero.bench.run import config_plan, measure_plan
    from hetero.model.sources import resolve_spec

    spec = resolve_spec("synthetic:tiny")
    plan = config_plan(spec, machine(), profile(), "bf16", "resident", 16, 40)
    return plan, measure_plan(plan, "synthetic:tiny", 16, 6, 40, repeats=2)


def test_measurement_has_every_metric(measured):
    plan, res = measured
    me = res["measured"]
    names = [u.name for u in plan.units]
    assert list(me["unit_decode_ms"]) == names and list(me["unit_prefill_ms"]) == names
    assert all(v >= 0 for v in me["unit_decode_ms"].values())
    # the per-unit split is scaled to sum to the median step and the median prefill
    assert sum(me["unit_decode_ms"].values()) == pytest.approx(1e3 / me["decode_tok_s"], rel=1e-3)
    assert sum(me["unit_prefill_ms"].values()) == pytest.approx(1e3 * me["ttft_s"], rel=1e-3)
    # each repeat's prefill rate is the prompt over its time to first token
    t_lo, t_hi = me["ranges"]["ttft_s"]
    assert me["ranges"]["prefill_tok_s"] == pytest.approx([16 / t_hi, 16 / t_lo])
    assert me["footprint_bytes"]["cpu"] > 50 << 20  # an interpreter with torch is never this small
    lo, hi = me["ranges"]["decode_tok_s"]
    assert lo <= me["decode_tok_s"] <= hi


def test_errors_are_relative_to_measured(measured):
    plan, res = measured
    pred, me, err = res["predicted"], res["measured"], res["error"]
    assert pred == predicted_of(plan)
    assert err["decode_tok_s"] == pytest.approx((pred["decode_tok_s"] - me["decode_tok_s"]) / me["decode_tok_s"])
    u = plan.units[1].name
    assert err["unit_decode_ms"][u] == pytest.approx(rel_error(pred["unit_decode_ms"][u], me["unit_decode_ms"][u]))
    assert rel_error(1.0, 0.0) is None


def test_report_renders_for_tiny(measured, tmp_path):
    import matplotlib.image as mpimg

    from hetero.bench.report import FIGURES, render

    plan, res = measured
    from hetero.cost import device_rates

    r = device_rates(machine(), profile())["cpu"]
    result = {"model": "synthetic:tiny", **res, "plan": plan.to_dict(),
              "roofline": {"cpu": {"gemm": r.gemm, "gemv": r.gemv}},
              "peers": [{"peer": "llama.cpp", "skipped": "not installed"},
                        {"peer": "transformers", "prefill_tok_s": {"median": 10.0}, "decode_tok_s": {"median": 2.0},
                         "footprint_bytes": {"cpu": 400 << 20}, "note": "bf16"}]}
    out = render(result, tmp_path / "rep")
    md = (out / "report.md").read_text()
    assert "decode_tok_s" in md and "skipped: not installed" in md and "layers.1" in md
    for f in FIGURES:
        p = out / f
        assert p.exists() and p.stat().st_size > 5000, f
        img = mpimg.imread(p)
        assert img.shape[0] > 100 and img.std() > 0.01, f  # not a blank canvas
        assert f"]({f})" in md
    # rendering again replaces the folder whole, and leaves no temporary folders behind
    render(result, tmp_path / "rep")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["rep"]
