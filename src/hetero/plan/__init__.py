"""hetero.plan: the cost-model-driven planner.

    make_plan(spec, hardware, profile, memory, objective=..., ...) -> Plan   the exact optimum
    parse_memory("cpu=2GB,cuda:0=4GB,disk=50%", spec) -> {device: bytes}
    baselines(spec, hardware, profile, memory, ...) -> [Plan]                 the usual tools' placements
    rescore(plan, spec, hardware, profile) -> Plan                            price a (hand-edited) plan
    Plan.load(path) / plan.save(path) / plan.explain()
"""
from __future__ import annotations

from hetero.plan.plan import PLAN_VERSION, BatchShare, Plan, Prediction, Stage, UnitPlan, Why, split_batch
from hetero.plan.units import fmt_bytes, parse_bytes, parse_memory


def make_plan(*args, **kwargs) -> Plan:
    """See hetero.plan.make.make_plan (imported lazily: it pulls in scipy)."""
    from hetero.plan.make import make_plan as _make_plan

    return _make_plan(*args, **kwargs)


def rescore(*args, **kwargs) -> Plan:
    from hetero.plan.make import rescore as _rescore

    return _rescore(*args, **kwargs)


def check_plan(*args, **kwargs) -> None:
    from hetero.plan.make import check_plan as _check

    return _check(*args, **kwargs)


def baselines(*args, **kwargs) -> list[Plan]:
    from hetero.plan.baselines import baselines as _baselines

    return _baselines(*args, **kwargs)


__all__ = ["make_plan", "parse_memory", "parse_bytes", "fmt_bytes", "baselines", "rescore", "check_plan",
           "Plan", "UnitPlan", "Prediction", "Stage", "BatchShare", "Why", "split_batch", "PLAN_VERSION"]
