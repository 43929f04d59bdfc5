"""Render a Plan for people: the unit table (runs of like units folded), totals, and why."""
from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Group
from rich.table import Table
from rich.text import Text

from hetero.plan.units import fmt_bytes

if TYPE_CHECKING:
    from hetero.plan.plan import Plan, UnitPlan


def _kind(name: str) -> str:
    """Which sequence of like units a unit belongs to: decoder layers, a MoE layer's routed experts, or
    itself (embed, head)."""
    if name.startswith("layers."):
        return "experts" if name.endswith(".experts") else "layers"
    return name


def _runs(units: tuple["UnitPlan", ...]) -> list[list["UnitPlan"]]:
    """Consecutive units of one kind with the same device, precision and residency, as one row each.
    A MoE model's layers and experts alternate: each kind folds over its own sequence (layers.0-47,
    layers.0-21.experts, ...), rows in order of their first unit."""
    out: list[list] = []
    open_run: dict[str, list] = {}
    for u in units:
        kind = _kind(u.name)
        key = (u.device, u.precision, u.residency)
        run = open_run.get(kind)
        if run is not None and kind in ("layers", "experts") and (run[0].device, run[0].precision, run[0].residency) == key:
            run.append(u)
            continue
        out.append([u])
        open_run[kind] = out[-1]
    return out


def _name(run: list["UnitPlan"]) -> str:
    if len(run) == 1:
        return run[0].name
    a, b = run[0].name.split(".")[1], run[-1].name.split(".")[1]
    tail = ".experts" if run[0].name.endswith(".experts") else ""
    return f"layers.{a}-{b}{tail} (x{len(run)})"


def unit_table(plan: "Plan") -> Table:
    t = Table(title=f"plan for {plan.model} on {plan.host} ({plan.kind}, objective: {plan.objective})",
              title_justify="left")
    for col, just in (("unit", "left"), ("device", "left"), ("precision", "left"), ("residency", "left"),
                      ("bytes", "right"), ("decode ms", "right"), ("prefill ms", "right")):
        t.add_column(col, justify=just)
    for run in _runs(plan.units):
        u = run[0]
        t.add_row(_name(run), u.device, u.precision, u.residency,
                  fmt_bytes(sum(x.bytes for x in run)), f"{sum(x.predicted_ms for x in run):.3f}",
                  f"{sum(x.prefill_ms for x in run):.2f}")
    return t


def totals(plan: "Plan") -> Table:
    t = Table(title="memory per device", title_justify="left")
    for col in ("device", "planned", "budget", "weights", "kv cache", "buffers", "workspace", "reserve"):
        t.add_column(col, justify="left" if col == "device" else "right")
    over = plan.over_budget()
    for d, used in plan.memory.items():
        b = plan.memory_breakdown.get(d, {})
        budget = plan.budgets.get(d)
        mark = " [red]OVER[/red]" if d in over else ""
        t.add_row(d, fmt_bytes(used) + mark, fmt_bytes(budget) if budget is not None else "-",
                  *(fmt_bytes(b.get(k, 0)) for k in ("weights", "kv", "buffers", "workspace")),
                  fmt_bytes(plan.reserve.get(d, 0)))
    return t


def summary(plan: "Plan") -> Text:
    p = plan.predicted
    lines = [
        f"predicted: decode {p.decode_tok_s:.2f} tok/s ({p.decode_ms:.2f} ms/step at context {plan.context}, "
        f"batch {plan.batch}), prefill {p.prefill_tok_s:.1f} tok/s, time to first token {p.ttft_s:.3f} s "
        f"for {plan.prompt_tokens} prompt tokens, throughput {p.throughput_tok_s:.2f} tok/s",
        f"quality loss (relative perplexity increase, estimated): {p.quality_loss:.4g}"
        + (f" (bound {plan.max_quality_loss:g})" if plan.max_quality_loss is not None else ""),
    ]
    cap = plan.kv_capacity()
    if cap:
        lines.append(f"KV cache: {plan.kv_dtype}, {fmt_bytes(cap['bytes'])} ({fmt_bytes(cap['per_token'])} per token) "
                     f"for {plan.batch} x {plan.context} tokens; this budget holds up to {cap['max_context']:,} "
                     f"tokens of context at batch {plan.batch}, or {cap['max_batch']:,} sequences of {plan.context}")
    w = plan.why
    if w.binding:
        lines.append("binding: " + "; ".join(w.binding))
    if w.alternative:
        lines.append("next best: " + w.alternative)
    lines += [f"  {a}" for a in w.alternatives]
    lines += [f"note: {n}" for n in w.notes]
    if plan.solver:
        lines.append(f"solver: {plan.solver.get('status')} in {plan.solver.get('seconds', 0):.3f} s "
                     f"({plan.solver.get('variables')} variables)")
    return Text("\n".join(lines))


def comparison(plans: list["Plan"]) -> Table:
    devs = list(dict.fromkeys(d for p in plans for d in p.memory))
    t = Table(title="compared (same cost model)", title_justify="left")
    t.add_column("plan")
    for col in ("decode tok/s", "prefill tok/s", "ttft s", "quality loss"):
        t.add_column(col, justify="right")
    for d in devs:
        t.add_column(d, justify="right")
    for p in plans:
        over = p.over_budget()
        t.add_row(p.kind, f"{p.predicted.decode_tok_s:.2f}", f"{p.predicted.prefill_tok_s:.1f}",
                  f"{p.predicted.ttft_s:.3f}", f"{p.predicted.quality_loss:.4g}",
                  *((fmt_bytes(p.memory.get(d, 0)) + (" [red]OVER[/red]" if d in over else "")) for d in devs))
    return t


def batch_table(plan: "Plan") -> Table:
    """Every batch size the planner priced: its best placement's rates, and why it lost."""
    bound = f", steps within {plan.max_latency_ms:g} ms" if plan.max_latency_ms is not None else ""
    t = Table(title=f"batch size (objective: {plan.objective}{bound}; chosen: {plan.batch})", title_justify="left")
    for col in ("batch", "decode tok/s (all)", "ms per token", "throughput tok/s", "why not"):
        t.add_column(col, justify="left" if col == "why not" else "right")
    for o in plan.batch_options:
        mark = " *" if o.batch == plan.batch else ""
        if not o.fits:
            t.add_row(f"{o.batch}{mark}", "-", "-", "-", o.note or "does not fit")
            continue
        t.add_row(f"{o.batch}{mark}", f"{o.decode_tok_s:.2f}", f"{o.decode_ms:.1f}", f"{o.throughput_tok_s:.2f}",
                  "chosen" if o.batch == plan.batch else o.note)
    return t


def explain(plan: "Plan", compare: list["Plan"] | None = None) -> Group:
    parts = [unit_table(plan), totals(plan), summary(plan)]
    if plan.batch_options:
        parts.insert(2, batch_table(plan))
    if compare:
        parts.append(comparison([plan, *compare]))
    return Group(*parts)
