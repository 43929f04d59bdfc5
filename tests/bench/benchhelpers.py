"""A toy machine with round numbers, and measured-looking runs made from the cost model itself."""
from __future__ import annotations

import dataclasses

from hetero.hardware.profile import PROFILE_VERSION
from hetero.hardware.types import DeviceProfile, DeviceSpec, HardwareSpec, LinkSpec, Measurement, Profile


def _m(x: float, unit: str) -> Measurement:
    return Measurement(median=x, min=x, max=x, unit=unit)


def machine() -> HardwareSpec:
    return HardwareSpec(
        host="bench-test",
        devices=(DeviceSpec("cpu", "cpu", memory_bytes=8 << 30, bandwidth=30e9, peak_flops={"fp32": 138e9, "bf16": 386e9}),
                 DeviceSpec("disk", "disk", memory_bytes=100 << 30, bandwidth=730e6 / 0.85)),
        links=(LinkSpec("cpu", "disk", 730e6),), source="test")


def profile(calibration: dict | None = None) -> Profile:
    gemm = {"fp32": _m(138e9, "FLOP/s"), "bf16": _m(386e9, "FLOP/s"), "int8": _m(300e9, "FLOP/s"),
            "int4": _m(200e9, "FLOP/s")}
    gemv = {p: _m(10e9, "B/s") for p in ("fp32", "bf16", "int8", "int4")}
    dev = DeviceProfile("cpu", gemm_flops=gemm, gemv_bandwidth=gemv, mem_bandwidth=_m(27e9, "B/s"),
                        op_overhead=_m(2e-6, "s"))
    return Profile(host="bench-test", version=PROFILE_VERSION, versions={}, devices={"cpu": dev},
                   disk_direct=_m(730e6, "B/s"), disk_cached=_m(8e9, "B/s"), calibration=dict(calibration or {}))


def fake_run(model: str, precision: str, residency: str, context: int, truth: Profile, prompt: int = 64) -> dict:
    """A run whose 'measured' per-unit times are what the cost model says under the `truth` profile."""
    from hetero.bench.run import config_plan
    from hetero.model.sources import resolve_spec

    spec = resolve_spec(model)
    hw = machine()
    truth_plan = config_plan(spec, hw, truth, precision, residency, prompt, context)
    base_plan = config_plan(spec, hw, dataclasses.replace(truth, calibration={}), precision, residency, prompt, context)
    dec = {u.name: u.predicted_ms for u in truth_plan.units}
    pre = {u.name: u.prefill_ms for u in truth_plan.units}
    p = truth_plan.predicted
    return {"config": {"model": model, "precision": precision, "residency": residency, "context": context,
                       "prompt_tokens": prompt, "new_tokens": 16, "repeats": 1},
            "plan": base_plan.to_dict(),
            "result": {"measured": {"unit_decode_ms": dec, "unit_prefill_ms": pre,
                                    "decode_tok_s": p.decode_tok_s, "prefill_tok_s": p.prefill_tok_s}}}
