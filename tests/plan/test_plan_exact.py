"""The solver's optimum equals brute force over every assignment (<= 8 units, 2-3 devices)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from hetero.errors import HeteroError
from hetero.plan.solve import solve
from hetero.plan.table import Workload, build_table
from tests.plan.helpers import cpu_machine, cpu_profile, gpu_machine, toy_spec


def brute_force(table, budgets, max_quality=None):
    """Min objective over all assignments, scored straight from the table's arrays (vectorised)."""
    U = len(table.units)
    per_unit = [np.flatnonzero(table.valid[u]) for u in range(U)]
    A = np.array(list(itertools.product(*per_unit)), dtype=np.int64)  # [N, U]
    if table.tied:
        A = A[A[:, 0] == A[:, -1]]
    rows = np.arange(U)[None, :]
    obj = table.unit_objective()[rows, A].sum(axis=1)
    devs = table.compute
    dev_of = np.array([devs.index(c.device) for c in table.choices])
    D = dev_of[A]  # [N, U] device index per unit
    cross = np.zeros((len(devs), len(devs)))
    for i, d in enumerate(devs):
        for j, e in enumerate(devs):
            if d != e:
                cross[i, j] = table.boundary_objective(d, e)
    obj = obj + cross[D[:, :-1], D[:, 1:]].sum(axis=1)
    ok = np.ones(len(A), dtype=bool)
    for m, budget in budgets.items():
        mem = table.weights[m][rows, A].sum(axis=1)
        if m in table.pools:
            mem = mem + table.pools[m][rows, A].max(axis=1)
        for i, d in enumerate(devs):
            if table.mem_of[d] == m:
                mem = mem + table.workspace[d] * (D == i).any(axis=1)
        ok &= mem <= budget
    if max_quality is not None:
        ok &= table.quality[rows, A].sum(axis=1) <= max_quality + 1e-12
    if not ok.any():
        return None, len(A)
    return float(obj[ok].min()), len(A)


def _check(spec, hw, prof, wl, budgets, precisions, max_quality=None, sensitivity=None):
    table = build_table(spec, hw, prof, wl, precisions, sensitivity)
    best, n = brute_force(table, budgets, max_quality)
    assert n <= 2_000_000
    if best is None:
        with pytest.raises(HeteroError):
            solve(table, budgets, max_quality)
        return None
    sol = solve(table, budgets, max_quality)
    ev = table.evaluate(sol.assign)
    assert not ev.over(budgets)
    assert ev.objective_s == pytest.approx(best, rel=1e-9, abs=1e-15)
    return ev


def mid_spec(layers: int, tied: bool = False):
    """Big enough that a GPU beats the CPU despite its launch overhead: a bf16 layer is ~7.3 MB."""
    return toy_spec(layers=layers, hidden=512, ffn=2048, heads=8, kv_heads=4, vocab=4096, tied=tied)


@pytest.mark.parametrize("objective", ["decode", "ttft", "throughput"])
@pytest.mark.parametrize("cpu_frac,gpu_frac", [(1.0, 1.0), (0.6, 0.3), (0.4, 0.5), (0.25, 0.7), (0.9, 0.15)])
def test_one_gpu_matches_brute_force(objective, cpu_frac, gpu_frac):
    spec = mid_spec(layers=3)                                # 5 units
    hw = gpu_machine()
    size = spec.total_bytes("bf16")
    budgets = {"cpu": int(cpu_frac * size), "cuda:0": int(gpu_frac * size), "disk": 10**9}
    wl = Workload(objective, prompt_tokens=16, context=32)
    _check(spec, hw, None, wl, budgets, ["bf16", "int8"])   # 10 choices a unit: 100 000 assignments


@pytest.mark.parametrize("precisions", [["bf16"], ["bf16", "int4"]])
@pytest.mark.parametrize("gpu_frac", [0.2, 0.45, 0.7])
def test_two_gpus_tied_matches_brute_force(gpu_frac, precisions):
    spec = mid_spec(layers=4, tied=True)                     # 6 units, embed and head share a matrix
    hw = gpu_machine(gpus=2, disk=False)
    size = spec.total_bytes("bf16")
    budgets = {"cpu": size // 2, "cuda:0": int(gpu_frac * size), "cuda:1": int(0.6 * gpu_frac * size)}
    _check(spec, hw, None, Workload("decode", 16, 32), budgets, precisions)  # bf16 at 0.2: nothing fits


@pytest.mark.parametrize("frac", [0.35, 0.5, 0.7, 1.0])
def test_cpu_disk_block_of_layers_matches_brute_force(frac):
    # 8 units; layers.1-4 have identical costs, so the solver counts them as one block
    spec = toy_spec(layers=6)
    hw, prof = cpu_machine(), cpu_profile()
    size = spec.total_bytes("bf16") + 80_000
    budgets = {"cpu": int(frac * size), "disk": 10**9}
    _check(spec, hw, prof, Workload("decode", 16, 32), budgets, ["bf16", "int4"])


@pytest.mark.parametrize("bound", [0.0, 0.004, 0.012, 0.03])
def test_quality_bound_matches_brute_force(bound):
    spec = toy_spec(layers=4)
    hw, prof = cpu_machine(), cpu_profile()
    budgets = {"cpu": spec.total_bytes("bf16"), "disk": 10**9}
    _check(spec, hw, prof, Workload("decode", 16, 32), budgets, ["bf16", "int8", "int4"], max_quality=bound)


def test_brute_force_sees_what_the_table_evaluates():
    # the vectorised scorer above and Table.evaluate agree on random assignments
    spec = mid_spec(layers=3)
    table = build_table(spec, gpu_machine(), None, Workload("throughput", 16, 32), ["bf16", "int8"])
    rng = np.random.default_rng(0)
    for _ in range(20):
        assign = [int(rng.choice(np.flatnonzero(table.valid[u]))) for u in range(len(table.units))]
        ev = table.evaluate(assign)
        budgets = {m: v for m, v in ev.memory.items()}
        sub = build_table(spec, gpu_machine(), None, Workload("throughput", 16, 32), ["bf16", "int8"])
        sub.valid[:] = False
        for u, k in enumerate(assign):
            sub.valid[u, k] = True
        best, n = brute_force(sub, budgets)
        assert n == 1 and best == pytest.approx(ev.objective_s, rel=1e-12)
