"""hetero.plan: the cost-model-driven planner.

    make_plan(spec, hardware, profile, memory, objective=..., ...) -> Plan   the exact optimum
    parse_memory("cpu=2GB,cuda:0=4GB,disk=50%", spec) -> {device: bytes}
    baselines(spec, hardware, profile, memory, ...) -> [Plan]                 the usual tools' placements
    rescore(plan, spec, hardware, profile) -> Plan                            price a (hand-edited) plan
    Plan.load(path) / plan.save(path) / plan.explain()
"""
from __future__ import annotations

# scipy is imported only when a plan is solved, so importing hetero.plan stays light
from hetero.plan.baselines import baselines
from hetero.plan.make import check_plan, make_plan, rescore
from hetero.plan.plan import PLAN_VERSION, Plan, Prediction, Stage, UnitPlan, Why
from hetero.plan.units import fmt_bytes, parse_bytes, parse_memory


__all__ = ["make_plan", "parse_memory", "parse_bytes", "fmt_bytes", "baselines", "rescore", "check_plan",
           "Plan", "UnitPlan", "Prediction", "Stage", "Why", "PLAN_VERSION"]
