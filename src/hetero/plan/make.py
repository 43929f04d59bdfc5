"""make_plan: budgets -> choice table -> exact solve -> a Plan with its predictions and the why.

Also: rescoring a (hand-edited) Plan with the cost model, and checking that a plan belongs to a
model and a machine.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from hetero.cost import Coefficients
from hetero.errors import HeteroError
from hetero.hardware.types import HardwareSpec, Profile
from hetero.model.spec import ModelSpec
from hetero.plan.plan import Plan, Prediction, UnitPlan, Why
from hetero.plan.experts import contiguous_experts, expert_notes
from hetero.plan.solve import solve
from hetero.plan.table import Choice, Evaluation, Table, Workload, build_table
from hetero.plan.units import fmt_bytes


def default_budgets(hw: HardwareSpec, memory: dict[str, int] | None) -> dict[str, int]:
    """Every memory device gets a budget: the one given, else what it has free (or its capacity)."""
    memory = dict(memory or {})
    shared = {d.name: getattr(d, "shares_memory_with", "") for d in hw.devices}
    names = [d.name for d in hw.devices if not shared.get(d.name)]
    for dev in memory:
        if dev not in names:
            hint = f" (its memory is {shared[dev]}'s: budget that)" if shared.get(dev) else ""
            raise HeteroError(f"no memory device {dev!r} on {hw.host}{hint}; have: {', '.join(names)}")
        if memory[dev] < 0:
            raise HeteroError(f"memory budget for {dev} is negative")
    out = {}
    for d in hw.devices:
        if d.name in names:
            out[d.name] = memory.get(d.name, d.available_bytes or d.memory_bytes)
    return out


def make_plan(spec: ModelSpec, hardware: HardwareSpec, profile: Profile | None = None,
              memory: dict[str, int] | None = None, objective: str = "decode", prompt_tokens: int = 512,
              context: int | None = None, batch: int = 1, max_quality_loss: float | None = None,
              precisions: list[str] | None = None, sensitivity: dict | None = None,
              reserve: dict[str, int] | None = None, coeffs: Coefficients | None = None,
              explain: bool = True, time_limit: float = 60.0, units: list[str] | None = None,
              pinned: dict[str, str] | None = None, kv_dtype: str = "auto", ragged: bool = False) -> Plan:
    """The fastest plan for the objective within every budget (and the quality bound, when given).

    memory: device -> bytes (unset devices get what they have free); reserve: bytes per device the
    runtime itself needs (interpreter, libraries), taken off the budgets first. context defaults to
    the prompt plus 128 new tokens. units: plan only this contiguous run (a pipeline stage);
    pinned: unit -> the precision it must take. kv_dtype: how the KV cache is stored (its bytes
    count in the budgets: int8 fits about twice the context or sequences of bf16). ragged: the
    `batch` sequences run in a batch runner (runtime/batch.py): its step's workspace, not a
    prefill of every prompt at once (plan/batch.py chooses the batch size itself).
    """
    context = context if context is not None else prompt_tokens + 128
    wl = Workload(objective, prompt_tokens, context, batch, kv_dtype, ragged)
    table = build_table(spec, hardware, profile, wl, precisions, sensitivity, coeffs, units=units)
    for name, prec in (pinned or {}).items():
        if name in table.units:
            keep = np.array([c.precision == prec for c in table.choices])
            if not keep.any():
                raise HeteroError(f"unit {name} must be {prec}, which no device here runs among these precisions")
            table.valid[table.units.index(name)] &= keep
    budgets = default_budgets(hardware, memory)
    reserve = {k: int(v) for k, v in (reserve or {}).items()}
    eff = {m: b - reserve.get(m, 0) for m, b in budgets.items()}
    if any(v < 0 for v in eff.values()):
        bad = next(m for m, v in eff.items() if v < 0)
        raise HeteroError(f"the runtime itself needs {fmt_bytes(reserve[bad])} of {bad}, more than its "
                          f"budget of {fmt_bytes(budgets[bad])}")
    sol = solve(table, eff, max_quality_loss, time_limit, reserve)
    sol.assign = contiguous_experts(table, sol.assign)
    why = explain_choice(table, sol.assign, eff, max_quality_loss) if explain else Why()
    return assemble(table, sol.assign, budgets, reserve, kind="hetero", prefetch=True,
                    max_quality_loss=max_quality_loss, precisions=precisions, why=why,
                    solver={"status": sol.status, "seconds": round(sol.seconds, 4),
                            "variables": sol.variables, "constraints": sol.constraints,
                            "backend": "scipy.optimize.milp (HiGHS)"})


def assemble(table: Table, assign: list[int], budgets: dict[str, int], reserve: dict[str, int],
             kind: str, prefetch: bool, max_quality_loss: float | None = None,
             precisions: list[str] | None = None, why: Why | None = None,
             solver: dict | None = None) -> Plan:
    """A Plan from one choice per unit, priced by the table."""
    ev = table.evaluate(assign, prefetch=prefetch)
    wl, spec = table.workload, table.spec
    units = []
    prev = None
    for u, k in enumerate(assign):
        ch = table.choices[k]
        # a unit whose input comes from another device waits for that transfer: it is charged there
        cross_d = table.act_decode.get((prev, ch.device), 0.0) if prev else 0.0
        cross_p = table.act_prefill.get((prev, ch.device), 0.0) if prev else 0.0
        units.append(UnitPlan(table.units[u], ch.device, ch.precision, ch.residency,
                              int(table.unit_bytes[u, k]), round((ev.unit_decode_s[u] + cross_d) * 1e3, 6),
                              round((ev.unit_prefill_s[u] + cross_p) * 1e3, 6)))
        prev = ch.device
    B, P, n = wl.batch, wl.prompt_tokens, wl.new_tokens
    pred = Prediction(
        prefill_tok_s=B * P / ev.prefill_s, decode_tok_s=B / ev.decode_s, ttft_s=ev.prefill_s,
        decode_ms=ev.decode_s * 1e3, prefill_ms=ev.prefill_s * 1e3,
        throughput_tok_s=B * n / (ev.prefill_s + n * ev.decode_s), quality_loss=ev.quality)
    return Plan(
        model=spec.name, fingerprint=spec.fingerprint(), host=table.hw.host, hardware=table.hw.source,
        objective=wl.objective, prompt_tokens=P, context=wl.context, batch=B, kv_dtype=wl.kv_dtype, ragged=wl.ragged,
        budgets=dict(budgets),
        units=tuple(units), memory=dict(ev.memory), predicted=pred, memory_breakdown=ev.breakdown,
        reserve=dict(reserve), precisions=tuple(precisions or sorted({c.precision for c in table.choices})),
        max_quality_loss=max_quality_loss, prefetch=prefetch, prefetch_depth=table.coeffs.prefetch_depth,
        kind=kind, why=why or Why(), solver=solver or {})


def _describe(ch: Choice) -> str:
    return f"{ch.device}/{ch.precision}/{ch.residency}"


def explain_choice(table: Table, assign: list[int], budgets: dict[str, int],
                   max_quality: float | None) -> Why:
    """The binding constraints; the next-best alternative (the cheapest single-unit change that still
    fits and costs time); and what doing without each device or precision the plan uses would cost."""
    ev = table.evaluate(assign)
    tps = table.workload.batch
    binding = []
    # a budget binds when the fastest plan with no budgets at all breaks it
    ideal = table.evaluate(solve(table, {}, None, time_limit=10.0).assign)
    if ideal.objective_s < ev.objective_s * (1 - 1e-9):
        for m, b in budgets.items():
            if ideal.memory.get(m, 0) > b:
                binding.append(f"{m} memory: the fastest plan ({tps / ideal.decode_s:.2f} decode tok/s) needs "
                               f"{fmt_bytes(ideal.memory[m])}, the budget is {fmt_bytes(b)} "
                               f"(this plan uses {fmt_bytes(ev.memory.get(m, 0))})")
        if max_quality is not None and ideal.quality > max_quality:
            binding.append(f"quality: the fastest plan loses {ideal.quality:.4g}, the bound is {max_quality:g}")
    unit = "ms per token" if table.workload.objective == "decode" else "ms"
    best = _best_single_change(table, assign, ev, budgets, max_quality)
    notes, alts = [], []
    if table.tied:
        notes.append("embed and head share one matrix (tied embeddings), so they share one choice")
    if not binding:
        notes.append("no budget binds: every unit has its fastest choice")
    notes += expert_notes(table, assign)
    used = [table.choices[k] for k in assign]
    for label, drop in ([(f"without {d}", lambda c, d=d: c.device == d) for d in dict.fromkeys(c.device for c in used)]
                        + [(f"without {p}", lambda c, p=p: c.precision == p)
                           for p in dict.fromkeys(c.precision for c in used)]):
        mask = table.valid & ~np.array([drop(c) for c in table.choices])[None, :]
        try:
            alt = solve(dataclasses.replace(table, valid=mask), budgets, max_quality, time_limit=10.0)
        except HeteroError:
            alts.append(f"{label}: nothing fits")
            continue
        e = table.evaluate(alt.assign)
        alts.append(f"{label}: {tps / e.decode_s:.2f} decode tok/s, {(e.objective_s - ev.objective_s) * 1e3:+.3f} "
                    f"{unit}, quality loss {e.quality:.4g}")
    if best is None:
        return Why(tuple(binding), "no other single-unit change fits", 0.0, 0.0, tuple(notes), tuple(alts))
    delta = (best[0] - ev.objective_s) * 1e3
    text = f"{best[1]}: {delta:+.3f} {unit} ({tps / best[2].decode_s:.2f} decode tok/s)"
    return Why(tuple(binding), text, tps / best[2].decode_s, best[0] * 1e3, tuple(notes), tuple(alts))


def _best_single_change(table: Table, assign: list[int], ev: Evaluation, budgets: dict[str, int],
                        max_quality: float | None):
    """(objective s, text, evaluation) of the cheapest single-unit change that fits and is not a
    tie (a change within 0.01% is the same plan for every practical purpose)."""
    best = None
    U = len(assign)
    floor = ev.objective_s * (1 + 1e-4)
    for u in range(U):
        if table.tied and u == 0:
            continue  # changed together with the head
        for k in range(len(table.choices)):
            if k == assign[u] or not table.valid[u, k]:
                continue
            alt = list(assign)
            alt[u] = k
            if table.tied and u == U - 1:
                alt[0] = k
            e = table.evaluate(alt)
            if e.objective_s <= floor or e.over(budgets) or (
                    max_quality is not None and e.quality > max_quality + 1e-12):
                continue
            if best is None or e.objective_s < best[0]:
                old, new = table.choices[assign[u]], table.choices[k]
                best = (e.objective_s, f"{table.units[u]} on {_describe(new)} instead of {_describe(old)}", e)
    return best


def choices_of(plan: Plan, table: Table) -> list[int]:
    if [u.name for u in plan.units] != table.units:
        raise HeteroError(f"the plan's units do not match {table.spec.name}'s "
                          f"({len(plan.units)} vs {len(table.units)} units)")
    return [table.index(Choice(u.device, u.precision, u.residency)) for u in plan.units]


def check_plan(plan: Plan, spec: ModelSpec, hardware: HardwareSpec | None = None) -> None:
    """Refuse a plan made for another model, or naming devices this machine lacks."""
    if plan.fingerprint and plan.fingerprint != spec.fingerprint():
        raise HeteroError(f"this plan was made for {plan.model} (fingerprint {plan.fingerprint}), "
                          f"not {spec.name} ({spec.fingerprint()})")
    if hardware is not None:
        have = {d.name for d in hardware.devices}
        missing = sorted({u.device for u in plan.units} - have)
        if missing:
            raise HeteroError(f"this plan uses {', '.join(missing)}, which {hardware.host} does not have "
                              f"(it has {', '.join(sorted(have))})")


def rescore(plan: Plan, spec: ModelSpec, hardware: HardwareSpec, profile: Profile | None = None,
            coeffs: Coefficients | None = None, sensitivity: dict | None = None) -> Plan:
    """The same placement priced again by the cost model (after a hand edit or a new calibration)."""
    check_plan(plan, spec, hardware)
    wl = Workload(plan.objective, plan.prompt_tokens, plan.context, plan.batch, plan.kv_dtype, plan.ragged)
    # the plan's precisions and any a hand edit brought in: what the workspace must provide for
    precs = sorted(set(plan.precisions) | {u.precision for u in plan.units}) or None
    table = build_table(spec, hardware, profile, wl, precs, sensitivity, coeffs, prefetch=plan.prefetch)
    assign = choices_of(plan, table)
    fresh = assemble(table, assign, plan.budgets, plan.reserve, plan.kind, plan.prefetch,
                     plan.max_quality_loss, list(plan.precisions), plan.why, plan.solver)
    return dataclasses.replace(fresh, stages=plan.stages, batch_options=plan.batch_options,
                               max_latency_ms=plan.max_latency_ms)


def fixed_plan(spec: ModelSpec, hardware: HardwareSpec, profile: Profile | None,
               choices: dict[str, tuple[str, str, str]], memory: dict[str, int] | None = None,
               prompt_tokens: int = 512, context: int | None = None, reserve: dict[str, int] | None = None,
               kv_dtype: str = "auto") -> Plan:
    """A Plan with the given (device, precision, residency) per unit — what `hetero.load(dtype=...,
    device=...)` asks for — priced by the cost model but not optimised, and budgets not enforced."""
    context = context if context is not None else prompt_tokens + 128
    precs = sorted({p for _, p, _ in choices.values()})
    table = build_table(spec, hardware, profile, Workload("decode", prompt_tokens, context, 1, kv_dtype), precs)
    assign = [table.index(Choice(*choices[u])) for u in table.units]
    return assemble(table, assign, default_budgets(hardware, memory), reserve or {}, kind="fixed",
                    prefetch=True, precisions=precs)
