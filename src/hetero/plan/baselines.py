"""What the usual tools would do with the same model, hardware and budgets, priced by the same cost model.

- accelerate-like: `device_map="auto"` with max_memory — fill GPUs, then CPU RAM, then disk, in model
  order, counting weight bytes only; a GPU keeps room for the largest layer when anything is
  offloaded; offloaded units run on the main device (GPU if any), streamed without prefetch.
- llama.cpp-like: `-ngl N` with N as large as fits — decoder layers (then the output layer) on the
  GPU, the rest computed on the CPU from RAM; what does not fit in RAM is paged in from disk as it is
  used (mmap), so it streams without prefetch. Token embeddings stay on the CPU.
- all-on-DEVICE: everything resident on one compute device.

Each uses one precision for every unit (the tools' model dtype). The tools count weights only
against their limits; like a careful user, `fitted` lowers a tool's limit on a device until the
whole run (KV cache, workspace, buffers included) fits that device's budget. When no setting fits,
the tool's plain setting is returned and reported over budget (Plan.over_budget), not hidden.
"""
from __future__ import annotations

from hetero.cost import Coefficients
from hetero.errors import HeteroError
from hetero.hardware.types import HardwareSpec, Profile
from hetero.model.spec import ModelSpec
from hetero.plan.make import assemble, default_budgets
from hetero.plan.plan import Plan
from hetero.plan.table import Choice, Table, Workload, build_table


def _pick(table: Table, device: str, precision: str, residency: str) -> int:
    return table.index(Choice(device, precision, residency))


def _tie(table: Table, assign: list[int], follow_embed: bool) -> list[int]:
    """Tied embeddings: one matrix, so embed and head take one placement."""
    if table.tied:
        if follow_embed:
            assign[-1] = assign[0]
        else:
            assign[0] = assign[-1]
    return assign


def accelerate_like(table: Table, budgets: dict[str, int], precision: str) -> list[int]:
    gpus = [d for d in table.compute if d != table.host and table.mem_of[d] != table.mem_of[table.host]]
    main = gpus[0] if gpus else table.host
    sizes = [int(table.unit_bytes[u, _pick(table, main, precision, "resident")]) for u in range(len(table.units))]
    total = sum(sizes)
    order = [*gpus, table.host]
    left = {d: budgets.get(table.mem_of[d], 0) for d in order}
    if gpus and total > left[gpus[0]]:
        for g in gpus:  # accelerate reserves the largest layer on GPUs for offloaded weights
            left[g] -= max(sizes)
    assign, i = [], 0
    for u, size in enumerate(sizes):
        while i < len(order) and size > left[order[i]]:
            i += 1
        if i < len(order):
            left[order[i]] -= size
            dev = order[i]
            res = "resident" if dev in gpus or not gpus else "ram"
            assign.append(_pick(table, dev if dev in gpus else main, precision, res))
        elif table.disk is None:
            raise HeteroError("accelerate-like: the model does not fit and there is no disk")
        else:
            assign.append(_pick(table, main, precision, "disk"))
    return _tie(table, assign, follow_embed=True)


def llamacpp_like(table: Table, budgets: dict[str, int], precision: str) -> list[int]:
    spec, wl = table.spec, table.workload
    U = len(table.units)
    gpus = [d for d in table.compute if d != table.host and table.mem_of[d] != table.mem_of[table.host]]
    host = table.host
    on_gpu: set[int] = set()
    if gpus:  # -ngl: layers from the first, then the output layer, while weights + KV + workspace fit
        g = gpus[0]
        m = table.mem_of[g]
        room = budgets.get(m, 0) - table.workspace[g]
        for u in [*range(1, U - 1), U - 1]:
            need = table.weights[m][u, _pick(table, g, precision, "resident")]
            if need > room:
                break
            room -= need
            on_gpu.add(u)
        if table.tied and U - 1 in on_gpu:
            on_gpu.discard(U - 1)  # the output matrix is the CPU-side token embedding
    hm = table.mem_of[host]
    room = budgets.get(hm, 0) - table.workspace[host]
    assign = []
    for u in range(U):
        if u in on_gpu:
            assign.append(_pick(table, gpus[0], precision, "resident"))
            continue
        k = _pick(table, host, precision, "resident")
        need = table.weights[hm][u, k]
        if need <= room or table.disk is None:
            room -= need
            assign.append(k)
        else:  # mmap: the pages it cannot keep are read again on every use
            assign.append(_pick(table, host, precision, "disk"))
    return _tie(table, assign, follow_embed=True)


def all_on(table: Table, device: str, precision: str) -> list[int]:
    return [_pick(table, device, precision, "resident")] * len(table.units)


def fitted(rule, table: Table, budgets: dict[str, int], precision: str, prefetch: bool) -> list[int]:
    """The rule's assignment with its limits lowered by each device's overrun until it fits."""
    limits = dict(budgets)
    for _ in range(64):
        assign = rule(table, limits, precision)
        over = table.evaluate(assign, prefetch).over(budgets)
        if not over:
            return assign
        for m, excess in over.items():
            limits[m] = limits.get(m, 0) - max(1, excess)
        if any(v < 0 for v in limits.values()):
            break
    return rule(table, budgets, precision)


def baselines(spec: ModelSpec, hardware: HardwareSpec, profile: Profile | None = None,
              memory: dict[str, int] | None = None, objective: str = "decode", prompt_tokens: int = 512,
              context: int | None = None, batch: int = 1, precision: str | list[str] = "bf16",
              coeffs: Coefficients | None = None, reserve: dict[str, int] | None = None) -> list[Plan]:
    """The baseline plans at one precision each (several precisions: every baseline at each)."""
    context = context if context is not None else prompt_tokens + 128
    table = build_table(spec, hardware, profile, Workload(objective, prompt_tokens, context, batch),
                        None, None, coeffs)
    budgets = default_budgets(hardware, memory)
    reserve = {k: int(v) for k, v in (reserve or {}).items()}
    eff = {m: b - reserve.get(m, 0) for m, b in budgets.items()}
    precs = [precision] if isinstance(precision, str) else list(precision)
    out = []
    for p in precs:
        if not any(c.precision == p for c in table.choices):
            raise HeteroError(f"no device here has kernels for {p}")
        runs = [(f"accelerate-like ({p})", fitted(accelerate_like, table, eff, p, False), False),
                (f"llama.cpp-like ({p})", fitted(llamacpp_like, table, eff, p, False), False)]
        for d in table.compute:
            if any(c.device == d and c.precision == p for c in table.choices):
                runs.append((f"all-on-{d} ({p})", all_on(table, d, p), True))
        for name, assign, prefetch in runs:
            out.append(assemble(table, assign, budgets, reserve, kind=name, prefetch=prefetch,
                                precisions=[p]))
    return out
