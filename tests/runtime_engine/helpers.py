"""Hand-made plans: the same model at one precision with a chosen residency per unit."""
from __future__ import annotations

from hetero.plan.plan import Plan, Prediction, UnitPlan


def uniform_plan(spec, precision: str = "fp32", disk: set[str] | frozenset = frozenset(), device: str = "cpu",
                 budgets: dict | None = None, memory: dict | None = None, prefetch: bool = True,
                 depth: int = 2, host: str = "test") -> Plan:
    """Every unit on `device` at `precision`; units named in `disk` stream from disk."""
    units = tuple(UnitPlan(u, device, precision, "disk" if u in disk else "resident", spec.unit_bytes(u, precision))
                  for u in spec.unit_names())
    return Plan(model=spec.name, fingerprint=spec.fingerprint(), host=host, hardware="this", objective="decode",
                prompt_tokens=16, context=64, batch=1, budgets=dict(budgets or {}), units=units,
                memory=dict(memory or {}), predicted=Prediction(1.0, 1.0, 1.0, 1.0, 1.0, 1.0),
                prefetch=prefetch, prefetch_depth=depth)


def half(spec) -> set[str]:
    """The second half of the layers and the head."""
    n = spec.n_layers
    return {f"layers.{i}" for i in range(n // 2, n)} | {"head"}


def everything(spec) -> set[str]:
    return set(spec.unit_names())
