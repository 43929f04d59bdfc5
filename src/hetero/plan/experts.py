"""MoE experts units in a plan: like choices gathered into runs, and the notes that say why they lie
where they do (`hetero plan` prints them under the table)."""
from __future__ import annotations

from collections import Counter

from hetero.errors import HeteroError
from hetero.plan.table import Choice, Table
from hetero.plan.units import fmt_bytes


def contiguous_experts(table: Table, assign: list[int]) -> list[int]:
    """The same plan with interchangeable MoE experts units' choices gathered into runs (llama.cpp's
    `--n-cpu-moe N` shape: the experts of N consecutive layers on the CPU) instead of the solver's
    arbitrary scatter. Experts units with identical cost rows take their choices in sorted order; kept
    only when the exact evaluation is unchanged (same time and memory)."""
    spec = table.spec
    if not spec.is_moe:
        return assign
    ex = [u for u, name in enumerate(table.units) if spec.is_experts_unit(name)]
    groups: dict[bytes, list[int]] = {}
    arrays = [table.decode, table.prefill, *table.weights.values(), *table.pools.values()]
    for u in ex:
        groups.setdefault(b"".join(a[u].tobytes() for a in arrays), []).append(u)
    out = list(assign)
    for us in groups.values():
        # devices in a fixed order (the host's first), then precision and residency
        ks = sorted((assign[u] for u in us), key=lambda k: (table.choices[k].device != table.host, k))
        for u, k in zip(us, ks):
            out[u] = k
    try:
        a, b = table.evaluate(assign), table.evaluate(out)
    except HeteroError:
        return assign
    same = (abs(a.objective_s - b.objective_s) <= 1e-9 * max(1.0, a.objective_s)
            and all(b.memory.get(m, 0) <= a.memory.get(m, 0) for m in a.memory))
    return out if same else assign


def expert_notes(table: Table, assign: list[int]) -> list[str]:
    """Where the routed experts went and what each alternative placement of one experts unit costs:
    computed where it lies, copied to a faster device per pass, or resident there."""
    spec = table.spec
    if not spec.is_moe:
        return []
    ex = [u for u, name in enumerate(table.units) if spec.is_experts_unit(name)]
    if not ex:
        return []
    wp, wd = table.objective_weights()
    used = Counter(table.choices[assign[u]] for u in ex)
    where = ", ".join(f"{n} on {c.device}/{c.precision}/{c.residency}" for c, n in used.most_common())
    p = table.choices[assign[ex[0]]].precision
    full = sum(table.unit_bytes[u, assign[u]] for u in ex)
    touched = spec.experts_touched(1) / spec.n_experts
    out = [f"routed experts ({len(ex)} layers, {fmt_bytes(full)}): {where}; a decode step reads "
           f"{spec.experts_per_token} of {spec.n_experts} per layer ({fmt_bytes(full * touched)} over all layers), a "
           f"{table.workload.prompt_tokens}-token prefill "
           f"{spec.experts_touched(table.workload.prompt_tokens * table.workload.batch):.0f} of them"]
    # one experts unit off the fastest device: what it costs where it is vs moved there
    ks = [k for k in range(len(table.choices)) if table.valid[ex[0], k]]
    fastest = table.choices[min(ks, key=lambda k: table.decode[ex[0], k])].device
    off = [u for u in ex if table.choices[assign[u]].device != fastest]
    if off:
        u = off[0]
        here = table.choices[assign[u]]
        obj = table.unit_objective()[u]

        def on(res: str) -> int | None:
            """The choice on `fastest` at residency `res`: this precision where it runs there, else
            the one the objective likes best."""
            ks = [k for k, c in enumerate(table.choices)
                  if c.device == fastest and c.residency == res and table.valid[u, k]]
            same = [k for k in ks if table.choices[k].precision == here.precision]
            return (same or sorted(ks, key=lambda k: obj[k]) or [None])[0]

        parts = []
        for label, k in (("here", assign[u]), (f"on {fastest} from RAM", on("ram")),
                         (f"resident on {fastest}", on("resident"))):
            if k is None:
                continue
            c = table.choices[k]
            prec = "" if c.precision == here.precision else f" at {c.precision}"
            parts.append(f"{label}{prec} {table.decode[u, k] * 1e3:.2f} ms/token, prefill {table.prefill[u, k] * 1e3:.1f} ms")
        out.append(f"{table.units[u]} ({here.device}/{here.precision}/{here.residency}): " + "; ".join(parts)
                   + f" (objective weights prefill {wp:g}, decode {wd:g}; resident on {fastest} needs "
                     f"{fmt_bytes(table.unit_bytes[u, assign[u]])} more there)")
    return out
