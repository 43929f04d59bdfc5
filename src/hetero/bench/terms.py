"""Which cost-model term a prediction is made of: a unit's decode and prefill time split into GEMM
FLOPs, weight/KV bytes, attention, dequantise passes and per-op overhead (cost.compute_terms), priced
the way the planner's table prices it (the head's prefill is the last prompt token only).

    terms(plan, spec, hw, profile)   # {"layers.0": {"decode": {...ms}, "prefill": {...ms}}, "head": ...}
"""
from __future__ import annotations


def terms(plan, spec, hw, profile, units: list[str] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    from hetero import cost

    rates = cost.device_rates(hw, profile)
    coeffs = cost.Coefficients()
    by_name = {u.name: u for u in plan.units}
    first = next((n for n in by_name if n.startswith("layers.")), None)
    out = {}
    for name in units or [n for n in (first, "head") if n in by_name]:
        u = by_name[name]
        r = rates[u.device]
        full = spec.unit_bytes(name, u.precision)
        ptok = 1 if name == "head" else plan.prompt_tokens
        dec = cost.compute_terms(spec, name, r, u.precision, full, 1, plan.context, plan.batch, coeffs)
        pre = cost.compute_terms(spec, name, r, u.precision, full, ptok, plan.prompt_tokens, plan.batch, coeffs)
        out[name] = {"rate_precision": r.rate_precision(spec, name, u.precision),
                     "decode": {k: v * 1e3 for k, v in dec.items()}, "prefill": {k: v * 1e3 for k, v in pre.items()}}
    return out
