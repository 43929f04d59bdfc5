"""Calibration, the closed loop: fit the cost model's coefficients to measured per-unit timings.

The cost model (hetero.cost) scales every rate by the multipliers in `Profile.calibration`:
"gemm_rate@cpu/bf16", "gemv_rate@cpu/int8", "mem_rate@cpu", "op_overhead@cpu", "disk_rate",
"overlap" (see cost.calibrated). `fit` searches those multipliers (in log space, scipy least
squares) so that the model's per-unit decode and prefill times match what was measured, pricing every
run through the planner's own choice table, so the fitted numbers mean exactly what the planner reads.

    runs = [run_config(cfg) for cfg in grid]             # hetero.bench.run
    f = fit(runs, hw, profile)                            # f.calibration, f.before, f.after
    store(f)                                              # into the cached Profile; later plans use it
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from dataclasses import dataclass, field

import numpy as np

from hetero.cost import DEQUANT_PRECISIONS
from hetero.dtypes import NATIVE
from hetero.hardware.types import HardwareSpec, Profile

SHAPE_MAX = 0.6  # bound on the fitted matrix-size exponent of the prefill rate (cost.gemm_shape_factor)
PRIOR = 0.02  # pull toward "no correction" for multipliers the data barely constrains


@dataclass
class Fit:
    calibration: dict[str, float]              # the fitted keys (merged over the profile's others)
    before: list[dict]                          # per run: label, predicted and measured tok/s, errors
    after: list[dict]
    params: list[str]
    cost: float = 0.0
    loo: list[dict] = field(default_factory=list)  # leave-one-out: each run predicted by a fit without it

    def summary(self) -> dict:
        return {"before": error_summary(self.before), "after": error_summary(self.after),
                **({"leave_one_out": error_summary(self.loo)} if self.loo else {})}

    def to_dict(self) -> dict:
        return {"calibration": self.calibration, "params": self.params, "summary": self.summary(),
                "before": self.before, "after": self.after, "leave_one_out": self.loo}


def label(run: dict) -> str:
    c = run["config"]
    return f"{c['model']} {c['precision']} {c['residency']} ctx{c['context']}"


def rate_precisions(run: dict) -> set[str]:
    """The precisions whose rates price a run's units: a `native` unit is priced at its main stored
    format's (cost.DeviceRates.rate_precision), so that is the key a fit must move."""
    units = run["plan"]["units"]
    if not any(u["precision"] == NATIVE for u in units):
        return {u["precision"] for u in units}
    from hetero.model.sources import resolve_spec

    spec = resolve_spec(run["config"]["model"])
    return {spec.native_format(u["name"]) if u["precision"] == NATIVE else u["precision"] for u in units}


def params_for(runs: list[dict]) -> list[str]:
    """The multipliers the runs can inform: per precision priced (matmul rates and the per-call cost
    of its kernels, which sets small models' speed; the prefill's dequantise pass where there is one),
    plus memory and disk, and the prefill rate's matrix-size exponent when the runs span models of
    different widths."""
    precs = sorted(set().union(*(rate_precisions(r) for r in runs)))
    devs = sorted({u["device"] for r in runs for u in r["plan"]["units"]})
    out = [f"{k}@{d}/{p}" for d in devs for p in precs for k in ("gemm_rate", "gemv_rate", "op_overhead")]
    out += [f"dequant_rate@{d}/{p}" for d in devs for p in precs if p in DEQUANT_PRECISIONS]
    out += [f"mem_rate@{d}" for d in devs]
    # attention grows as P^2, the GEMMs as P, the dequantise pass per pass: three prompt lengths tell them apart
    if len({r["plan"].get("workload", {}).get("prompt_tokens") for r in runs}) > 2:
        out += [f"attn_rate@{d}" for d in devs]
    if len({r["config"]["model"] for r in runs}) > 1:  # matrix sizes differ only between models
        out += [f"gemm_shape@{d}/{p}" for d in devs for p in precs]
    if any(u["residency"] == "disk" for r in runs for u in r["plan"]["units"]):
        out += ["disk_rate", "overlap"]
    return out


class Pricer:
    """Prices one run's plan per unit under any calibration, through hetero.plan.table."""

    def __init__(self, run: dict, hw: HardwareSpec):
        from hetero.model.sources import resolve_spec
        from hetero.plan.plan import Plan

        self.run, self.hw = run, hw
        self.plan = Plan.from_dict(run["plan"])
        self.spec = resolve_spec(run["config"]["model"])
        self.units = [u.name for u in self.plan.units]
        m = run["result"]["measured"]
        self.meas_dec = np.array([m["unit_decode_ms"][u] for u in self.units]) / 1e3
        self.meas_pre = np.array([m["unit_prefill_ms"][u] for u in self.units]) / 1e3
        self.meas_dec_tok_s = m["decode_tok_s"]
        self.meas_pre_tok_s = m["prefill_tok_s"]

    def price(self, profile: Profile) -> tuple[np.ndarray, np.ndarray]:
        """(decode seconds per unit, prefill seconds per unit), boundary transfers included."""
        from hetero.plan.make import choices_of
        from hetero.plan.table import Workload, build_table

        p = self.plan
        wl = Workload(p.objective, p.prompt_tokens, p.context, p.batch, p.kv_dtype)
        table = build_table(self.spec, self.hw, profile, wl, sorted({u.precision for u in p.units}),
                            prefetch=p.prefetch)
        ev = table.evaluate(choices_of(p, table))
        dec, pre = np.array(ev.unit_decode_s), np.array(ev.unit_prefill_s)
        # boundary transfers (none on one device) go to the unit after the boundary, as Plan does
        dec[-1] += ev.decode_s - dec.sum()
        pre[-1] += ev.prefill_s - pre.sum()
        return dec, pre

    def errors(self, profile: Profile) -> dict:
        dec, pre = self.price(profile)
        P = self.plan.prompt_tokens
        pd, pp = 1.0 / dec.sum(), P / pre.sum()
        return {"config": label(self.run), "predicted_decode_tok_s": pd, "measured_decode_tok_s": self.meas_dec_tok_s,
                "predicted_prefill_tok_s": pp, "measured_prefill_tok_s": self.meas_pre_tok_s,
                "decode_error": (pd - self.meas_dec_tok_s) / self.meas_dec_tok_s,
                "prefill_error": (pp - self.meas_pre_tok_s) / self.meas_pre_tok_s}

    def residuals(self, profile: Profile) -> np.ndarray:
        """Per unit, relative to the measured total (so big units count most), plus log total errors."""
        dec, pre = self.price(profile)
        td, tp = self.meas_dec.sum(), self.meas_pre.sum()
        return np.concatenate([(dec - self.meas_dec) / td, (pre - self.meas_pre) / tp,
                               [math.log(dec.sum() / td), math.log(pre.sum() / tp)]])


def _with(profile: Profile, cal: dict[str, float]) -> Profile:
    return dataclasses.replace(profile, calibration=dict(cal))


def _solve(pricers: list[Pricer], profile: Profile, params: list[str], base: dict[str, float]):
    from scipy.optimize import least_squares

    # overlap (0..1) and the shape exponents (-SHAPE_MAX..SHAPE_MAX) are fitted as values; every other
    # parameter as the log of a multiplier, pulled toward 1 by the prior (the exponents toward 0)
    def direct(name: str) -> bool:
        return name == "overlap" or name.startswith("gemm_shape")

    def cal_of(x: np.ndarray) -> dict[str, float]:
        cal = dict(base)
        for name, v in zip(params, x):
            cal[name] = float(min(1.0, max(0.0, v))) if name == "overlap" else float(v) if direct(name) \
                else float(math.exp(v))
        return cal

    def resid(x: np.ndarray) -> np.ndarray:
        prof = _with(profile, cal_of(x))
        r = [p.residuals(prof) for p in pricers]
        prior = [PRIOR * v for n, v in zip(params, x) if n != "overlap"]
        return np.concatenate(r + [np.array(prior)])

    def start(n: str) -> float:
        if n == "overlap":
            return min(1.0, max(0.0, base.get(n, 1.0)))
        return base.get(n, 0.0) if direct(n) else math.log(base.get(n, 1.0))

    x0 = np.array([start(n) for n in params])
    lo = np.array([0.0 if n == "overlap" else -SHAPE_MAX if direct(n) else math.log(1 / 50) for n in params])
    hi = np.array([1.0 if n == "overlap" else SHAPE_MAX if direct(n) else math.log(50) for n in params])
    x0 = np.clip(x0, lo + 1e-9, hi - 1e-9)
    sol = least_squares(resid, x0, bounds=(lo, hi), x_scale=1.0, diff_step=1e-3, max_nfev=200)
    return cal_of(sol.x), float(sol.cost)


def fit(runs: list[dict], hw: HardwareSpec, profile: Profile, params: list[str] | None = None,
        leave_one_out: bool = False) -> Fit:
    """Least-squares multipliers for `params` (default: params_for(runs)); other calibration keys of
    the profile are kept. The fit starts from no correction, so fitting twice gives the same answer."""
    params = params or params_for(runs)
    pricers = [Pricer(r, hw) for r in runs]
    keep = {k: v for k, v in profile.calibration.items() if k not in params}
    uncal = _with(profile, keep)
    before = [p.errors(profile) for p in pricers]  # what the profile predicted before this fit
    cal, cost_ = _solve(pricers, uncal, params, keep)
    cal = share_device_factor(cal, params)
    after = [p.errors(_with(profile, cal)) for p in pricers]
    loo = []
    if leave_one_out and len(pricers) > 2:
        for i, p in enumerate(pricers):
            rest = pricers[:i] + pricers[i + 1:]
            c_i, _ = _solve(rest, uncal, params, keep)
            loo.append(p.errors(_with(profile, c_i)))
    return Fit(cal, before, after, params, cost_, loo)


def share_device_factor(cal: dict[str, float], params: list[str]) -> dict[str, float]:
    """Move the common part of the fitted per-precision rate multipliers to the device's own key:
    "gemv_rate@cpu/q4_1" x0.27 and ".../q8_0" x0.96 become "gemv_rate@cpu" x0.51 and x0.53, x1.9.
    Every fitted precision prices exactly as before; a precision the grid did not measure now takes
    the device's typical correction instead of none, so the planner does not prefer it for being
    the only one still at its optimistic probe figure."""
    out = dict(cal)
    for kind in ("gemm_rate", "gemv_rate"):
        by_dev: dict[str, list[str]] = {}
        for n in params:
            if n.startswith(kind + "@") and "/" in n:
                by_dev.setdefault(n[len(kind) + 1:].split("/")[0], []).append(n)
        for dev, names in by_dev.items():
            g = math.exp(statistics.fmean(math.log(out[n]) for n in names))
            out[f"{kind}@{dev}"] = out.get(f"{kind}@{dev}", 1.0) * g
            for n in names:
                out[n] /= g
    return out


def error_summary(rows: list[dict]) -> dict:
    """Median and worst absolute relative error of decode and prefill tok/s over runs."""
    out = {"runs": len(rows)}
    for k in ("decode_error", "prefill_error"):
        xs = [abs(r[k]) for r in rows if r.get(k) is not None]
        out[k] = {"median_abs": statistics.median(xs) if xs else None, "max_abs": max(xs) if xs else None}
    return out


def store(f: Fit, profile: Profile | None = None) -> Profile:
    """Write the fitted calibration into the cached Profile (atomically) and the fit's details beside it."""
    from hetero.hardware.profile import get_profile, save
    from hetero.paths import cache_dir

    prof = profile or get_profile(progress=False)
    new = _with(prof, f.calibration)
    save(new)
    path = cache_dir() / "calibration" / f"{prof.host}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(f.to_dict(), indent=1))
    os.replace(tmp, path)
    return new
