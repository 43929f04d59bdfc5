"""Calibration recovers multipliers it did not see, from timings the cost model made under them."""
from __future__ import annotations

import json

import pytest

from hetero.bench.calibrate import Pricer, error_summary, fit, params_for, store
from hetero.bench.run import config_plan
from hetero.cost import calibrated as cost_calibrated
from benchhelpers import fake_run, machine, profile

TRUTH = {"gemv_rate@cpu/bf16": 0.5, "gemv_rate@cpu/int8": 0.4, "gemm_rate@cpu/bf16": 0.3,
         "gemm_rate@cpu/int8": 0.6, "op_overhead@cpu/int8": 3.0, "disk_rate": 1.5}


@pytest.fixture(scope="module")
def runs():
    truth = profile(TRUTH)
    return [fake_run(m, p, r, c, truth) for m in ("synthetic:tiny", "synthetic:llama-1b")
            for p in ("bf16", "int8") for r in ("resident", "disk") for c in (128, 1024)]


def test_params_cover_what_the_runs_use(runs):
    ps = params_for(runs)
    assert {"gemm_rate@cpu/bf16", "gemv_rate@cpu/int8", "mem_rate@cpu", "op_overhead@cpu/bf16", "disk_rate", "overlap"} <= set(ps)
    assert not any("fp32" in p for p in ps)  # no run used fp32: nothing to fit there


def test_fit_shrinks_error_to_near_zero(runs):
    f = fit(runs, machine(), profile())
    before, after = error_summary(f.before), error_summary(f.after)
    # the uncalibrated model is far off (gemv x0.5 alone doubles decode time) ...
    assert before["decode_error"]["median_abs"] > 0.3
    assert before["prefill_error"]["max_abs"] > 0.3
    # ... the fitted one reproduces the truth's tok/s
    assert after["decode_error"]["max_abs"] < 0.02
    assert after["prefill_error"]["max_abs"] < 0.02
    from hetero.cost import calibrated

    assert calibrated(f.calibration, "gemv_rate", "cpu", "bf16") == pytest.approx(0.5, rel=0.1)
    assert calibrated(f.calibration, "gemv_rate", "cpu", "int8") == pytest.approx(0.4, rel=0.1)


def test_pricer_matches_rescored_plan(runs):
    """The fit prices plans through the planner's table: the same numbers a fresh plan carries."""
    from hetero.model.sources import resolve_spec

    prof = profile({"gemv_rate@cpu/bf16": 0.7})
    r = runs[0]
    dec, pre = Pricer(r, machine()).price(prof)
    plan = config_plan(resolve_spec(r["config"]["model"]), machine(), prof, "bf16", r["config"]["residency"],
                       64, r["config"]["context"])
    assert list(dec * 1e3) == pytest.approx([u.predicted_ms for u in plan.units], rel=1e-4, abs=2e-6)
    assert list(pre * 1e3) == pytest.approx([u.prefill_ms for u in plan.units], rel=1e-4, abs=2e-6)


def test_store_writes_profile_and_details(runs, tmp_path, monkeypatch):
    from hetero.cost import device_rates
    from hetero.hardware.profile import load_cached
    from hetero.paths import cache_dir

    monkeypatch.setenv("HETERO_CACHE", str(tmp_path))
    f = fit(runs[:4], machine(), profile())
    new = store(f, profile())
    cached = load_cached("bench-test")
    assert cached is not None and cached.calibration == new.calibration == f.calibration
    # later plans read it: the calibrated rate differs from the uncalibrated one by the multiplier
    m = cost_calibrated(f.calibration, "gemv_rate", "cpu", "bf16")
    assert device_rates(machine(), cached)["cpu"].gemv["bf16"] == pytest.approx(10e9 * m)
    details = json.loads((cache_dir() / "calibration" / "bench-test.json").read_text())
    assert details["summary"]["after"]["runs"] == 4


def test_fit_recovers_a_negative_matrix_size_exponent():
    """Prefill of two model widths under a known shape exponent (small matrices relatively slow):
    the fit finds the sign and size of it, which one rate multiplier alone cannot express."""
    truth = profile({"gemm_shape@cpu/bf16": -0.2, "gemm_rate@cpu/bf16": 0.5})
    runs = [fake_run(m, "bf16", "resident", 128, truth) for m in ("synthetic:tiny", "synthetic:llama-1b")]
    f = fit(runs, machine(), profile())
    assert f.calibration["gemm_shape@cpu/bf16"] == pytest.approx(-0.2, abs=0.03)
    assert error_summary(f.after)["prefill_error"]["max_abs"] < 0.02
    one_rate = fit(runs, machine(), profile(), params=[p for p in params_for(runs) if "gemm_shape" not in p])
    assert error_summary(one_rate.after)["prefill_error"]["max_abs"] > 0.05


@pytest.fixture(scope="module")
def q8_file(tmp_path_factory):
    from hetero.cli import main

    out = tmp_path_factory.mktemp("gguf") / "tiny.Q8_0.gguf"
    try:
        main(["compress", "synthetic:tiny", "--format", "gguf", "--type", "Q8_0", "-o", str(out), "--no-progress",
              "--eval-tokens", "0"])
    except SystemExit as e:
        assert not e.code
    return str(out)


def block_profile(calibration=None):
    """The toy profile with Q8_0 measured: its GEMM probe below bf16's (a dequantise pass per GEMM)."""
    import dataclasses

    from benchhelpers import _m

    p = profile(calibration)
    dev = p.devices["cpu"]
    dev = dataclasses.replace(dev, gemm_flops={**dev.gemm_flops, "q8_0": _m(250e9, "FLOP/s")},
                              gemv_bandwidth={**dev.gemv_bandwidth, "q8_0": _m(12e9, "B/s")})
    return dataclasses.replace(p, devices={"cpu": dev})


def test_native_runs_fit_their_stored_formats_rates(q8_file):
    """A quantised file runs `native`: the fit moves the keys its units are priced at (q8_0's), including
    the prefill's per-pass dequantise cost, told apart from the GEMM by two prompt lengths."""
    truth = block_profile({"gemm_rate@cpu/q8_0": 0.4, "dequant_rate@cpu/q8_0": 0.5, "gemv_rate@cpu/q8_0": 0.7,
                           "attn_rate@cpu": 0.1})
    runs = [fake_run(q8_file, "native", "resident", c, truth, prompt=p) for c, p in ((128, 16), (512, 200), (1024, 512))]
    ps = params_for(runs)
    assert {"gemm_rate@cpu/q8_0", "gemv_rate@cpu/q8_0", "dequant_rate@cpu/q8_0", "attn_rate@cpu"} <= set(ps)
    assert "attn_rate@cpu" not in params_for(runs[::2])  # two prompt lengths cannot tell it from the GEMM
    assert not any(p.endswith("/native") for p in ps)
    f = fit(runs, machine(), block_profile())
    assert error_summary(f.before)["prefill_error"]["max_abs"] > 0.3
    assert error_summary(f.after)["decode_error"]["max_abs"] < 0.02
    assert error_summary(f.after)["prefill_error"]["max_abs"] < 0.02
    assert cost_calibrated(f.calibration, "gemv_rate", "cpu", "q8_0") == pytest.approx(0.7, rel=0.1)
    # a prompt length the grid did not have is priced as the truth prices it
    mid = fake_run(q8_file, "native", "resident", 512, truth, prompt=128)
    assert Pricer(mid, machine()).errors(dataclasses_replace(block_profile(), f.calibration))["prefill_error"] \
        == pytest.approx(0.0, abs=0.03)


def dataclasses_replace(prof, cal):
    import dataclasses

    return dataclasses.replace(prof, calibration=dict(cal))


def test_calibrate_grid_defaults_to_the_measured_plan_and_native_for_a_quantised_file(q8_file):
    from hetero.commands.bench import calibration_grid
    from hetero.model.sources import resolve_spec

    spec = resolve_spec(q8_file)
    plan = config_plan(spec, machine(), block_profile(), "int8", "disk", 32, 128)
    assert calibration_grid(spec, plan) == (["int8", "native"], ["disk", "resident"])
    plain = resolve_spec("synthetic:tiny")
    assert calibration_grid(plain, config_plan(plain, machine(), profile(), "bf16", "resident", 32, 128)) == \
        (["bf16"], ["resident"])


def test_a_precision_the_grid_did_not_measure_takes_the_devices_typical_correction():
    from hetero.bench.calibrate import share_device_factor
    from hetero.cost import device_rates

    params = ["gemv_rate@cpu/bf16", "gemv_rate@cpu/int8", "gemm_rate@cpu/bf16", "mem_rate@cpu"]
    fitted = {"gemv_rate@cpu/bf16": 0.5, "gemv_rate@cpu/int8": 0.4, "gemm_rate@cpu/bf16": 0.3, "mem_rate@cpu": 2.0}
    cal = share_device_factor(fitted, params)
    assert cal["gemv_rate@cpu"] == pytest.approx((0.5 * 0.4) ** 0.5) and cal["gemm_rate@cpu"] == pytest.approx(0.3)
    new = device_rates(machine(), profile(cal))["cpu"]
    old = device_rates(machine(), profile(fitted))["cpu"]
    plain = device_rates(machine(), profile())["cpu"]
    # fitted precisions price exactly as the fit left them ...
    assert new.gemv["bf16"] == pytest.approx(old.gemv["bf16"]) and new.gemv["int8"] == pytest.approx(old.gemv["int8"])
    assert new.gemm["bf16"] == pytest.approx(old.gemm["bf16"]) and new.mem == pytest.approx(old.mem)
    # ... and int4, in no run, takes the device's typical correction instead of its optimistic probe figure
    assert old.gemv["int4"] == plain.gemv["int4"]
    assert new.gemv["int4"] == pytest.approx(plain.gemv["int4"] * (0.5 * 0.4) ** 0.5)
    assert new.gemm["int4"] == pytest.approx(plain.gemm["int4"] * 0.3)
