"""Contract between the planner and the engine: every (device kind, precision, residency) the planner
may emit builds and runs; every one the engine refuses on purpose raises a one-line HeteroError, and
a plan made for a run never contains it.

The set is derived from the planner's own tables, not written by hand: `build_table` on a machine
that has a device of every kind the cost model prices (Coefficients.gemm_eff: cpu, cuda, mps, xpu)
and a disk, both from spec sheets and with a profile that measured every precision (a measured
device is offered whatever it measured, e.g. fp16 on a CPU).

CPU choices run for real. CUDA choices run on a real GPU when there is one, else under
hetero.runtime.devices.simulated_cuda: torch reports a GPU, tensors placed on "cuda:N" stay on the
CPU, streams and events do nothing. That checks the plumbing (the CUDA branches are the ones built,
the plan loads, streams and generates), not CUDA: no GPU kernel, copy or synchronisation runs here.
"""
from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

import hetero
from hetero import cost
from hetero.dtypes import PRECISIONS
from hetero.errors import HeteroError
from hetero.hardware.catalog import resolve
from hetero.hardware.types import DeviceProfile, DeviceSpec, Measurement, Profile
from hetero.ops.linear import RUNNABLE_KINDS
from hetero.plan.table import Workload, build_table
from hetero.runtime import devices
from hetero.runtime.engine import Engine
from tests.runtime_engine.helpers import uniform_plan

TINY = "synthetic:tiny"
PROMPT = "The quick brown fox jumps"
NEW = 3
CUDA = torch.cuda.is_available()


def every_kind_machine():
    """cpu + cuda:0 + disk (catalog h200), plus an mps and an xpu device: one of every priced kind."""
    hw = resolve("catalog:h200")
    extra = (DeviceSpec("mps", "mps", 64 << 30, 400e9, shares_memory_with="cpu"),
             DeviceSpec("xpu:0", "xpu", 16 << 30, 500e9))
    return dataclasses.replace(hw, devices=hw.devices + extra)


def measured_everything(hw) -> Profile:
    def m(v, unit):
        return Measurement(v, v, v, unit)
    devs = {d.name: DeviceProfile(d.name, {p: m(1e11, "FLOP/s") for p in PRECISIONS},
                                  {p: m(1e10, "B/s") for p in PRECISIONS})
            for d in hw.compute_devices()}
    return Profile("contract", 2, {}, devs)


def planner_choices() -> set[tuple[str, str, str]]:
    spec = hetero.spec(TINY)
    hw = every_kind_machine()
    kind = {d.name: d.kind for d in hw.devices}
    out = set()
    for prof in (None, measured_everything(hw)):
        table = build_table(spec, hw, prof, Workload("decode", 16, 64))
        out |= {(kind[c.device], c.precision, c.residency) for c in table.choices}
    return out


CHOICES = sorted(planner_choices())
RUNS = [c for c in CHOICES if c[0] in RUNNABLE_KINDS]
REFUSED = [c for c in CHOICES if c[0] not in RUNNABLE_KINDS]
DEVICE = {"cpu": "cpu", "cuda": "cuda:0", "mps": "mps", "xpu": "xpu:0"}


def test_the_set_is_the_planners():
    kinds = {k for k, _, _ in CHOICES}
    assert kinds == set(cost.Coefficients().gemm_eff)  # every kind the cost model prices
    # every precision this (dense) model can be held at; native and the formats hetero cannot
    # quantise to need a file stored in them (tests/ops/test_native_model.py builds those)
    assert {p for _, p, _ in CHOICES} == set(hetero.spec(TINY).runnable_precisions())
    assert set(hetero.spec(TINY).runnable_precisions()) < set(PRECISIONS)
    assert {r for _, _, r in CHOICES} == set(cost.RESIDENCIES)
    # every runnable kind x precision x residency is offered, except a CPU unit "in RAM": that is
    # where a CPU computes from, so the planner offers it only as resident
    precs = hetero.spec(TINY).runnable_precisions()
    want = {(k, p, r) for k in RUNNABLE_KINDS for p in precs for r in cost.RESIDENCIES} - \
        {("cpu", p, "ram") for p in precs}
    assert set(RUNS) == want


def plan_at(spec, kind: str, precision: str, residency: str):
    """Every unit at the choice (so embed, the layers and the head each take it)."""
    base = uniform_plan(spec, precision, device=DEVICE[kind])
    return dataclasses.replace(base, units=tuple(dataclasses.replace(u, residency=residency) for u in base.units))


def run(plan):
    with Engine.load(plan, TINY, progress=False) as e:
        ids = e.generate(PROMPT, max_new_tokens=NEW, chat=False)
        net = e.model.net
        x = torch.tensor([e.model.prompt_ids(PROMPT, chat=False)])
        logits = net(x, 0, net.new_cache(1, x.shape[1] + 1), last_only=False).float().cpu()
        info = {"prefetchers": [(pf.cuda, pf.read_bytes) for pf in e.prefetchers],
                "layer_device": str(getattr(net.layers[0], "device", "")),
                "qkv": getattr(getattr(net.layers[0], "template", net.layers[0]), "qkv")}
    return ids, logits, info


@pytest.fixture(scope="module")
def reference():
    return run(uniform_plan(hetero.spec(TINY), "fp32"))


@pytest.mark.parametrize("choice", RUNS, ids=lambda c: "/".join(c))
def test_every_planner_choice_builds_and_runs(choice, reference):
    kind, precision, residency = choice
    spec = hetero.spec(TINY)
    shim = devices.simulated_cuda() if kind == "cuda" and not CUDA else contextlib.nullcontext()
    with shim:
        ids, logits, info = run(plan_at(spec, kind, precision, residency))
    ref_ids, ref_logits, _ = reference
    assert len(ids) == NEW and torch.isfinite(logits).all()
    rel = float((logits - ref_logits).norm() / ref_logits.norm())
    if precision == "fp32":  # lossless: the reference's tokens
        assert ids == ref_ids
        assert rel < 1e-4
    else:  # lossy, but the same function: near the reference
        assert rel < {"bf16": 0.03, "fp16": 0.03, "int8": 0.06, "int4": 0.4}[precision], rel
    assert info["layer_device"] == DEVICE[kind]
    streamed = residency == "disk" or (residency == "ram" and kind != "cpu")
    assert bool(info["prefetchers"]) == streamed
    if streamed:
        assert all(is_cuda == (kind == "cuda") for is_cuda, _ in info["prefetchers"])
        if residency == "disk":
            assert sum(n for _, n in info["prefetchers"]) > 0
    if kind == "cuda" and precision == "int4":
        # off the CPU: torch's CUDA kernel when it checks out on a GPU, else the rows layout dequantised
        assert info["qkv"].layout in (("tinygemm", "rows") if CUDA else ("rows",))


@pytest.mark.parametrize("precision", sorted({p for k, p, _ in RUNS if k == "cuda"}))
def test_cuda_units_compute_what_cpu_units_do(precision):
    """The CUDA branches (torch's weight-only kernels or block-wise dequantisation) hold the same
    quantised weights as the CPU's: their logits agree to bf16 rounding, far under the quantisation."""
    spec = hetero.spec(TINY)
    _, cpu_logits, _ = run(plan_at(spec, "cpu", precision, "resident"))
    with devices.simulated_cuda() if not CUDA else contextlib.nullcontext():
        _, cuda_logits, _ = run(plan_at(spec, "cuda", precision, "resident"))
    # CPU without the compiled kernels runs int4 through torch's own int4 kernel, whose bf16
    # roundings differ from dequantise + GEMM: still far under the quantisation's own error (0.4)
    from hetero.ops import kernels
    tol = 3e-2 if precision == "int4" and kernels.get() is None else 1e-2
    assert float((cuda_logits - cpu_logits).norm() / cpu_logits.norm()) < tol


@pytest.mark.parametrize("choice", REFUSED, ids=lambda c: "/".join(c))
def test_refused_choices_raise_and_are_never_planned_for_a_run(choice, monkeypatch):
    kind, precision, residency = choice
    spec = hetero.spec(TINY)
    with pytest.raises(HeteroError, match=f"not supported by this engine"):
        Engine.load(plan_at(spec, kind, precision, residency), TINY, progress=False)
    # a run plans on this machine's devices through engine._machine: refused kinds are dropped
    from hetero.runtime import engine

    hw = every_kind_machine()
    monkeypatch.setattr("hetero.hardware.machine", lambda name: (hw, None))
    run_hw, _ = engine._machine("this")
    assert kind not in {d.kind for d in run_hw.devices}
    table = build_table(spec, run_hw, measured_everything(run_hw), Workload("decode", 16, 64))
    assert all(run_hw.device(c.device).kind in RUNNABLE_KINDS for c in table.choices)


def test_run_plans_keep_room_for_the_cuda_context(monkeypatch):
    """plan_for_run's reserve holds each CUDA device's context + workspaces, taken off its budget."""
    from hetero.runtime import engine

    hw = resolve("catalog:h200")
    monkeypatch.setattr("hetero.hardware.machine", lambda name: (hw, None))
    monkeypatch.setattr(engine.baseline, "runtime_baseline", lambda model=None: 300 << 20)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    budget = 2 * devices.cuda_reserve_bytes()
    plan, _ = engine.plan_for_run(TINY, memory_text=f"cuda:0={budget}")
    assert plan.reserve["cuda:0"] == devices.cuda_reserve_bytes() > devices.CUDA_CONTEXT_BYTES
    assert plan.memory.get("cuda:0", 0) + plan.reserve["cuda:0"] <= budget
    assert devices.cuda_reserve(hw) == {"cuda:0": devices.cuda_reserve_bytes()}
    assert devices.cuda_reserve(resolve("catalog:m3max")) == {}


def test_simulation_restores_torch():
    real = (torch.zeros, torch.Tensor.to, torch.cuda.is_available, torch.Generator)
    with devices.simulated_cuda():
        assert torch.cuda.is_available() and torch.zeros(2, device="cuda:0").device.type == "cpu"
        assert devices.physical("cuda:1") == torch.device("cpu")
    assert (torch.zeros, torch.Tensor.to, torch.cuda.is_available, torch.Generator) == real
    assert devices.physical("cuda:1") == torch.device("cuda:1")


def test_cuda_timings_wait_for_the_device(monkeypatch):
    """Per-unit and per-step CUDA timings synchronise (kernel launches return before the work ends)."""
    from hetero.bench.measure import measure_engine

    spec = hetero.spec(TINY)
    plan = uniform_plan(spec, "bf16")
    plan = dataclasses.replace(plan, units=tuple(dataclasses.replace(u, device="cuda:0") if u.name != "embed"
                                                 else u for u in plan.units))
    waits = []
    real = torch.cuda.synchronize
    with devices.simulated_cuda(), monkeypatch.context() as mp:  # undone before the simulation is
        mp.setattr(torch.cuda, "synchronize", lambda d=None: waits.append(str(d)))
        with Engine.load(plan, TINY, progress=False) as e:
            m = measure_engine(e, prompt_tokens=4, new_tokens=3, repeats=1, warmup=0)
    assert torch.cuda.synchronize is real
    assert m.unit_decode_ms and set(waits) == {"cuda:0"}
    # each decode step waits before and after; the per-unit pass waits around every layer too
    assert len(waits) >= 2 * 3 * 2 + 2 * spec.n_layers * 3


@pytest.mark.gpu
def test_seeded_sampling_on_cuda_repeats():
    """Probabilities on the GPU are drawn with a generator there, and a seed repeats the draws."""
    from hetero.runtime.sampling import Sampler, SamplingParams

    logits = torch.randn(1000, generator=torch.Generator().manual_seed(1)).to("cuda:0")
    draws = []
    for _ in range(2):
        s = Sampler(SamplingParams(temperature=1.0, seed=7))
        draws.append([s(logits, []) for _ in range(8)])
        assert s.gen.device.type == "cuda"
    assert draws[0] == draws[1] and len(set(draws[0])) > 1
