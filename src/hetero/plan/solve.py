"""The optimiser: an exact MILP (scipy.optimize.milp / HiGHS) over one (device, precision, residency)
per unit, under per-device memory budgets and an optional quality budget.

Units with identical costs at consecutive positions form a block (all middle decoder layers, say).
Variables
    n[b,k]     integer 0..|b|: how many units of block b take choice k (a one-hot binary when |b| = 1)
    o[b,π]     binary: block b runs as contiguous device segments in the order π (e.g. cuda:0 then cpu)
    a[b,k]     binary: some unit of block b takes streamed choice k (it then needs room in a pool)
    y[d]       binary: compute device d runs any unit (it then needs its activation workspace)
    pool[m]    continuous: prefetch pool on memory device m = max over streamed units of their buffer
    s[b,d,e]   continuous in [0,1]: block b ends on d and block b+1 starts on e (d != e), so
               activations cross d->e; s >= last[b,d] + first[b+1,e] - 1. Minimisation makes s exact.
Objective: sum of unit times (the workload's mix of prefill and decode) + every boundary crossing,
inside blocks (between segments of π) and between blocks.

Why this is exact: units of a block are interchangeable, so only the counts matter for time, memory
and quality; and since crossing costs obey the triangle inequality (activations take the fastest
route), running each device's units of a block as one segment is never worse than splitting them.
Brute force over per-unit assignments checks this in tests/plan.

Choices that another choice on the same device beats in every respect (time, quality, bytes on
every memory device, pool bytes) are dropped before solving: this is exact, and it shrinks the
problem a lot (fp32 is never better than bf16 when both cost no quality, for instance).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from hetero.errors import HeteroError
from hetero.plan.table import Table

MiB = float(1 << 20)


@dataclass
class Solution:
    assign: list[int]
    objective_s: float
    seconds: float
    status: str
    variables: int
    constraints: int


def candidates(table: Table, budgets: dict[str, int]) -> list[list[int]]:
    """Per unit, the choices worth considering: allowed, fitting alone, and not dominated."""
    obj = table.unit_objective()
    mems = list(table.memory_devices)
    pools = list(table.pools)
    U, K = obj.shape

    def vec(u: int) -> np.ndarray:
        cols = [obj[u], table.quality[u]] + [table.weights[m][u] for m in mems] + [table.pools[m][u] for m in pools]
        return np.stack(cols, axis=1)  # [K, dims]

    vecs = [vec(u) for u in range(U)]
    if table.tied:  # embed and head share one choice: judge them together
        both = np.concatenate([vecs[0] + vecs[-1], vecs[0][:, 2 + len(mems):], vecs[-1][:, 2 + len(mems):]], axis=1)
        vecs[0] = vecs[-1] = both
    dev = np.array([table.compute.index(c.device) for c in table.choices])
    same_dev = dev[:, None] == dev[None, :]
    earlier = np.arange(K)[:, None] < np.arange(K)[None, :]      # [j, k]: j < k
    out: list[list[int]] = []
    prev = None
    for u in range(U):
        v = vecs[u]
        ok = table.valid[u].copy()
        for m in mems:  # a choice that alone needs more than the budget can never be used
            ok &= table.weights[m][u] + (table.pools[m][u] if m in table.pools else 0) <= budgets.get(m, np.inf)
        if prev is not None and np.array_equal(ok, prev[0]) and np.array_equal(v, prev[1]):
            out.append(list(out[-1]))  # identical layers: same verdict
            continue
        tol = 1e-12 * np.abs(v)[None, :, :]
        le = (v[:, None, :] <= v[None, :, :] + tol).all(axis=2)   # [j, k]: j no worse than k anywhere
        lt = (v[:, None, :] < v[None, :, :] - tol).any(axis=2)    # [j, k]: j better somewhere
        dom = ok[:, None] & same_dev & le & (lt | earlier) & ~np.eye(K, dtype=bool)
        keep = ok & ~dom.any(axis=0)
        out.append([int(k) for k in np.flatnonzero(keep)])
        prev = (ok, v)
    if table.tied:
        common = sorted(set(out[0]) & set(out[-1]))
        out[0] = out[-1] = common
    return out


@dataclass
class Block:
    """Consecutive units with identical costs: the solver counts how many take each choice and in
    which device order they run, instead of one binary per unit — identical layers are
    interchangeable, and counting removes the symmetry that makes per-unit binaries slow."""
    units: list[int]
    cands: list[int]

    @property
    def size(self) -> int:
        return len(self.units)


def blocks(table: Table, cands: list[list[int]]) -> list[Block]:
    arrays = [table.decode, table.prefill, table.quality, *table.weights.values(), *table.pools.values()]
    out: list[Block] = []
    U = len(table.units)
    for u in range(U):
        same = (out and 0 < u < U - 1 and out[-1].units[-1] != 0 and cands[u] == out[-1].cands
                and all(np.array_equal(a[u], a[out[-1].units[0]]) for a in arrays))
        if same:
            out[-1].units.append(u)
        else:
            out.append(Block([u], list(cands[u])))
    return out


def _orders(devs: list[str], size: int) -> list[tuple[str, ...]]:
    """Device orders a block's segments can run in: sequences of distinct devices, at most `size` long."""
    from itertools import permutations

    return [p for n in range(1, min(size, len(devs)) + 1) for p in permutations(devs, n)]


class _Model:
    """The sparse MILP for a table, candidate choices and budgets; `run` takes any objective."""

    def __init__(self, table: Table, cands: list[list[int]], budgets: dict[str, int],
                 max_quality: float | None, slack_bytes: float = 0.0):
        self.table = table
        U = len(table.units)
        self.blocks = bl = blocks(table, cands)
        ch = table.choices
        col = 0
        self.n: list[tuple[int, int, int]] = []          # (column, block, choice)
        for b, blk in enumerate(bl):
            for k in blk.cands:
                self.n.append((col, b, k))
                col += 1
        pool_ms = [m for m in table.pools if any(table.pools[m][bl[b].units[0], k] > 0 for _, b, k in self.n)]
        self.a: dict[tuple[int, int], int] = {}          # (block, choice) -> column of "any unit takes k"
        for c, b, k in self.n:
            if bl[b].size > 1 and any(table.pools[m][bl[b].units[0], k] > 0 for m in pool_ms):
                self.a[(b, k)] = col
                col += 1
        self.o: list[tuple[int, int, tuple[str, ...]]] = []  # (column, block, device order)
        self.devs_of = []
        for b, blk in enumerate(bl):
            devs = sorted({ch[k].device for k in blk.cands})
            self.devs_of.append(devs)
            for order in _orders(devs, blk.size):
                self.o.append((col, b, order))
                col += 1
        self.y = {d: col + i for i, d in enumerate(table.compute)}
        col += len(table.compute)
        n_int = col
        self.pool = {m: col + i for i, m in enumerate(pool_ms)}
        col += len(pool_ms)
        self.s: list[tuple[int, int, str, str]] = []     # (column, block before the boundary, d, e)
        for b in range(len(bl) - 1):
            for d in self.devs_of[b]:
                for e in self.devs_of[b + 1]:
                    if d != e:
                        self.s.append((col, b, d, e))
                        col += 1
        self.ncols = col
        rows, cols, vals, lo, hi = [], [], [], [], []

        def row(entries, lb, ub):
            r = len(lo)
            for c, v in entries:
                rows.append(r)
                cols.append(c)
                vals.append(v)
            lo.append(lb)
            hi.append(ub)

        n_by_block: dict[int, list[tuple[int, int]]] = {}
        for c, b, k in self.n:
            n_by_block.setdefault(b, []).append((c, k))
        o_by_block: dict[int, list[tuple[int, tuple[str, ...]]]] = {}
        for c, b, order in self.o:
            o_by_block.setdefault(b, []).append((c, order))
        for b, blk in enumerate(bl):
            row([(c, 1.0) for c, _ in n_by_block[b]], blk.size, blk.size)
            row([(c, 1.0) for c, _ in o_by_block[b]], 1.0, 1.0)
            for d in self.devs_of[b]:  # units run only on devices of the chosen order
                ent = [(c, 1.0) for c, k in n_by_block[b] if ch[k].device == d]
                ent += [(c, -float(blk.size)) for c, order in o_by_block[b] if d in order]
                row(ent, -np.inf, 0.0)
        if table.tied:  # embed and head: one choice
            head = {k: c for c, k in n_by_block[len(bl) - 1]}
            for c, k in n_by_block[0]:
                row([(c, 1.0), (head[k], -1.0)], 0.0, 0.0)
        self.mem_rows: dict[str, list[tuple[int, float]]] = {}
        for m in table.memory_devices:
            ent = [(c, table.weights[m][bl[b].units[0], k] / MiB) for c, b, k in self.n
                   if table.weights[m][bl[b].units[0], k]]
            if m in self.pool:
                ent.append((self.pool[m], 1.0))
            ent += [(self.y[d], table.workspace[d] / MiB) for d in table.compute if table.mem_of[d] == m]
            self.mem_rows[m] = ent
            if m in budgets:
                # the exact bytes are checked after solving; `slack_bytes` tightens a retry
                row(ent, -np.inf, (budgets[m] - slack_bytes) / MiB)
        for m, pc in self.pool.items():
            for b, blk in enumerate(bl):
                u = blk.units[0]
                if blk.size == 1:
                    ent = [(c, table.pools[m][u, k] / MiB) for c, k in n_by_block[b] if table.pools[m][u, k] > 0]
                    if ent:
                        row(ent + [(pc, -1.0)], -np.inf, 0.0)
                    continue
                for c, k in n_by_block[b]:
                    if table.pools[m][u, k] > 0:
                        row([(self.a[(b, k)], table.pools[m][u, k] / MiB), (pc, -1.0)], -np.inf, 0.0)
        for (b, k), ac in self.a.items():
            c = next(c for c, kk in n_by_block[b] if kk == k)
            row([(c, 1.0), (ac, -float(bl[b].size))], -np.inf, 0.0)
        for d, yc in self.y.items():
            ent = [(c, 1.0) for c, b, k in self.n if ch[k].device == d]
            if ent:
                row(ent + [(yc, -float(U))], -np.inf, 0.0)
        for sc, b, d, e in self.s:  # boundary b -> b+1 crosses d -> e
            ent = [(c, 1.0) for c, order in o_by_block[b] if order[-1] == d]
            ent += [(c, 1.0) for c, order in o_by_block[b + 1] if order[0] == e]
            row(ent + [(sc, -1.0)], -np.inf, 1.0)
        self.quality = [(c, table.quality[bl[b].units[0], k]) for c, b, k in self.n
                        if table.quality[bl[b].units[0], k]]
        if max_quality is not None:
            row(self.quality, -np.inf, max_quality + 1e-12)
        from scipy.sparse import coo_matrix  # scipy loads only when something is solved

        self.A = coo_matrix((vals, (rows, cols)), shape=(len(lo), self.ncols)).tocsr()
        self.lb, self.ub = np.array(lo), np.array(hi)
        self.integrality = np.zeros(self.ncols)
        self.integrality[:n_int] = 1
        self.upper = np.full(self.ncols, np.inf)
        for c, b, k in self.n:
            self.upper[c] = bl[b].size
        self.upper[len(self.n):n_int] = 1
        for sc, *_ in self.s:
            self.upper[sc] = 1

    @property
    def variables(self) -> int:
        return self.ncols

    def time_objective(self) -> np.ndarray:
        t = self.table
        c = np.zeros(self.ncols)
        obj = t.unit_objective()
        for col, b, k in self.n:
            c[col] = obj[self.blocks[b].units[0], k] * 1e3  # ms: keeps coefficients near 1
        for col, b, order in self.o:  # crossings inside a block, segment to segment
            c[col] = sum(t.boundary_objective(d, e) for d, e in zip(order, order[1:])) * 1e3
        for col, b, d, e in self.s:
            c[col] = t.boundary_objective(d, e) * 1e3
        return c

    def linear(self, entries: list[tuple[int, float]]) -> np.ndarray:
        c = np.zeros(self.ncols)
        for j, v in entries:
            c[j] += v
        return c

    def run(self, c: np.ndarray, time_limit: float) -> tuple[list[int] | None, str]:
        from scipy.optimize import LinearConstraint, milp

        res = milp(c, integrality=self.integrality, bounds=(np.zeros(self.ncols), self.upper),
                   constraints=LinearConstraint(self.A, self.lb, self.ub),
                   options={"time_limit": time_limit, "mip_rel_gap": 1e-9, "presolve": True})
        if res.x is None:
            return None, res.message
        x = np.round(res.x).astype(int)
        assign: list[int] = []
        for b, blk in enumerate(self.blocks):
            order = next(o for col, bb, o in self.o if bb == b and x[col] == 1)
            counts = [(k, x[col]) for col, bb, k in self.n if bb == b and x[col] > 0]
            for d in order:  # segments in the chosen device order
                for k, cnt in counts:
                    if self.table.choices[k].device == d:
                        assign += [k] * int(cnt)
        if len(assign) != len(self.table.units):
            return None, "inconsistent solution"
        status = "optimal" if res.status == 0 else f"stopped: {res.message}"
        return assign, status


def solve(table: Table, budgets: dict[str, int], max_quality: float | None = None,
          time_limit: float = 60.0, reserve: dict[str, int] | None = None) -> Solution:
    """The assignment minimising the table's objective within `budgets`; HeteroError if none exists,
    naming the smallest budget that would work."""
    t0 = time.perf_counter()
    cands = candidates(table, budgets)
    # HiGHS's tolerances are a fraction of a byte on rows in MiB; should rounding still put a plan
    # a byte over, solve again a few bytes tighter
    for slack in (0.0, 4.0) if all(cands) else ():
        model = _Model(table, cands, budgets, max_quality, slack)
        assign, status = model.run(model.time_objective(), time_limit)
        if assign is None:
            break
        ev = table.evaluate(assign)
        if not ev.over(budgets) and (max_quality is None or ev.quality <= max_quality + 1e-9):
            return Solution(assign, ev.objective_s, time.perf_counter() - t0, status,
                            model.variables, model.A.shape[0])
    raise HeteroError(infeasible_message(table, budgets, max_quality, reserve))


def min_usage(table: Table, budgets: dict[str, int], max_quality: float | None, device: str,
              time_limit: float = 30.0) -> int | None:
    """The least memory `device` needs with every other budget as given; None if no budget of it works."""
    relaxed = {m: b for m, b in budgets.items() if m != device}
    cands = candidates(table, relaxed)
    if not all(cands):
        return None
    model = _Model(table, cands, relaxed, max_quality)
    assign, _ = model.run(model.linear(model.mem_rows[device]), time_limit)
    if assign is None:
        return None
    return table.evaluate(assign).memory[device]


def min_quality(table: Table, budgets: dict[str, int], time_limit: float = 30.0) -> float | None:
    cands = candidates(table, budgets)
    if not all(cands):
        return None
    model = _Model(table, cands, budgets, None)
    assign, _ = model.run(model.linear(model.quality), time_limit)
    if assign is None:
        return None
    return table.evaluate(assign).quality


def infeasible_message(table: Table, budgets: dict[str, int], max_quality: float | None,
                       reserve: dict[str, int] | None = None) -> str:
    """Why nothing fits, naming the smallest change of one budget that would make it fit.
    `budgets` are what the plan may use; `reserve` (runtime baseline) is added back when reporting."""
    from hetero.plan.units import fmt_bytes

    reserve = reserve or {}

    if max_quality is not None:
        q = min_quality(table, budgets)
        if q is not None and q > max_quality:
            scale = 10.0 ** (5 - math.floor(math.log10(q)))  # 6 significant digits, rounded up,
            up = math.ceil(q * scale * (1 + 1e-12)) / scale   # so that the printed bound works as given
            return (f"no plan keeps the quality loss within {max_quality:g} under these memory budgets; "
                    f"the smallest max-quality-loss that works is {up:g} (or give more memory)")
    fixes = []
    for m in table.memory_devices:
        if m not in budgets:
            continue
        need = min_usage(table, budgets, max_quality, m)
        if need is not None and need > budgets[m]:
            need, have = need + reserve.get(m, 0), budgets[m] + reserve.get(m, 0)
            fixes.append(f"{m}={fmt_bytes(need, up=True)} ({need} B; have {fmt_bytes(have)})")
    if fixes:
        return ("no plan fits the memory budgets; the smallest budget that works, others unchanged: "
                + " or ".join(fixes))
    return ("no plan fits the memory budgets, and raising any single one is not enough; "
            f"budgets: {', '.join(f'{m}={fmt_bytes(b + reserve.get(m, 0))}' for m, b in budgets.items())}")
