from __future__ import annotations

import json
import os

import pytest
import torch

from hetero.hardware import bench, profile
from hetero.hardware.catalog import resolve
from hetero.hardware.inventory import host_name, inventory
from hetero.hardware.profile import PROFILE_VERSION, ProfileCacheWarning, get_profile, measure
from hetero.hardware.types import DeviceSpec, HardwareSpec, Profile


def _check(m, unit):
    assert m is not None and m.unit == unit
    assert 0 < m.min <= m.median <= m.max
    assert m.repeats >= 1


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_measure_cpu_and_disk(tiny, no_cuda):
    prof = measure(inventory(), progress=False, sizes=tiny)
    assert list(prof.devices) == ["cpu"]  # no GPU: no GPU rows
    cpu = prof.devices["cpu"]
    for p in ("fp32", "bf16", "int8", "int4"):
        _check(cpu.gemm_flops[p], "FLOP/s")
        _check(cpu.gemv_bandwidth[p], "B/s")
    _check(cpu.mem_bandwidth, "B/s")
    _check(cpu.mem_read_bandwidth, "B/s")
    _check(cpu.op_overhead, "s")
    assert cpu.h2d_pinned is None and cpu.h2d_pageable is None
    _check(prof.disk_direct, "B/s")
    _check(prof.disk_cached, "B/s")
    assert prof.versions["torch"] == torch.__version__ and "python" in prof.versions and "hetero" in prof.versions
    assert prof.version == PROFILE_VERSION and prof.measured_at
    assert Profile.from_dict(json.loads(json.dumps(prof.to_dict()))) == prof
    # memory bandwidth is sampled once after every second turn of the others, those `repeats` per round
    cpu_probes = bench.device_probes(bench.Backend("cpu"), tiny)
    others = sum(not p.spread for p in cpu_probes) + 2  # + the two disk probes
    assert cpu.mem_bandwidth.repeats == cpu.mem_read_bandwidth.repeats == -(-tiny.rounds * others // 2)
    assert cpu.gemm_flops["bf16"].repeats == tiny.rounds * tiny.repeats
    # the batched-decode row kernels: one round (they price extra rows, not the main rates)
    for p in ("fp32", "bf16", "int8", "int4", "q4_0"):
        _check(cpu.gemm_rows[p], "FLOP/s")
    assert cpu.gemm_rows["bf16"].repeats == tiny.repeats


class FakeCuda(bench.Backend):
    """Runs on the CPU but takes the CUDA code path (sync, pinned copies)."""

    def __init__(self):
        super().__init__("cpu")
        self.is_cuda = True
        self.syncs = 0

    def sync(self):
        self.syncs += 1

    def pin(self, t):
        return t


def test_gpu_branch_with_a_fake_backend(tiny, monkeypatch):
    fakes = {}

    def backend_for(name):
        if name.startswith("cuda"):
            fakes[name] = FakeCuda()
            return fakes[name]
        return bench.Backend(name)

    monkeypatch.setattr(bench, "backend_for", backend_for)
    spec = resolve("rtx4090")  # cpu + cuda:0 + disk
    prof = measure(spec, progress=False, sizes=tiny)
    assert set(prof.devices) == {"cpu", "cuda:0"}
    gpu = prof.devices["cuda:0"]
    _check(gpu.h2d_pinned, "B/s")
    _check(gpu.h2d_pageable, "B/s")
    _check(gpu.gemm_flops["bf16"], "FLOP/s")
    assert fakes["cuda:0"].syncs > 0  # the timing waited on the device
    assert prof.devices["cpu"].h2d_pinned is None


def test_missing_kernels_leave_no_row(tiny, monkeypatch):
    monkeypatch.setattr(bench, "matmul_op", lambda prec, *a, **k: None if prec == "int4" else
                        (lambda: torch.zeros(1)))
    spec = HardwareSpec(host="x", devices=(DeviceSpec(name="cpu", kind="cpu", memory_bytes=1),))
    prof = measure(spec, progress=False, sizes=tiny)
    assert "int4" not in prof.devices["cpu"].gemm_flops and "fp32" in prof.devices["cpu"].gemm_flops
    assert prof.disk_direct is None  # no disk device in the spec, nothing measured


def test_progress_bar_runs(tiny, no_cuda):
    spec = HardwareSpec(host="x", devices=(DeviceSpec(name="cpu", kind="cpu", memory_bytes=1),))
    assert measure(spec, progress=True, sizes=tiny).devices["cpu"].mem_bandwidth is not None


@pytest.fixture
def counted(monkeypatch, tiny):
    """measure() with tiny sizes, counting calls."""
    calls = []
    real = profile.measure

    def fake(spec, quick=True, progress=True, sizes=None):
        calls.append(quick)
        return real(spec, quick=quick, progress=False, sizes=tiny)

    monkeypatch.setattr(profile, "measure", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return calls


def test_profile_is_cached_per_host(cache, counted):
    p1 = get_profile(progress=False)
    path = cache / "profiles" / f"{host_name()}.json"
    assert path.exists()
    assert [f.name for f in path.parent.iterdir()] == [path.name]  # the temp file was renamed away
    p2 = get_profile(progress=False)
    assert counted == [True] and p2 == p1
    get_profile(refresh=True, progress=False)
    assert counted == [True, True]


def test_a_profile_without_row_rates_gets_only_those_measured(cache, counted, tiny, monkeypatch):
    import dataclasses

    from hetero.hardware.profile import missing_rows, save

    monkeypatch.setattr(bench, "QUICK", tiny)

    old = get_profile(progress=False)
    bare = {n: dataclasses.replace(d, gemm_rows={}) for n, d in old.devices.items()}
    save(dataclasses.replace(old, devices=bare, calibration={"gemv_rate@cpu": 1.5}))
    got = get_profile(progress=False)
    assert counted == [True]  # no full re-measure
    assert not missing_rows(got) and got.devices["cpu"].gemm_rows["bf16"].median > 0
    assert got.calibration == {"gemv_rate@cpu": 1.5} and got.devices["cpu"].gemm_flops == old.devices["cpu"].gemm_flops
    assert get_profile(progress=False) == got  # saved: measured once


def test_full_request_does_not_take_a_quick_cache(counted):
    get_profile(quick=True, progress=False)
    full = get_profile(quick=False, progress=False)
    assert counted == [True, False] and full.mode == "full"
    assert get_profile(quick=True, progress=False).mode == "full"  # a full one serves quick requests
    assert len(counted) == 2


@pytest.mark.parametrize("content, why", [
    ("{not json", "unreadable"),
    (json.dumps({"version": PROFILE_VERSION - 1, "devices": {}}), "version"),
    (json.dumps({"version": PROFILE_VERSION, "host": "h"}), "unreadable"),  # missing fields
    (json.dumps([1, 2]), "version"),
])
def test_bad_cached_profile_warns_and_remeasures(cache, counted, content, why):
    path = cache / "profiles" / f"{host_name()}.json"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.warns(ProfileCacheWarning, match=why):
        prof = get_profile(progress=False)
    assert counted == [True] and prof.version == PROFILE_VERSION
    assert json.loads(path.read_text())["version"] == PROFILE_VERSION  # replaced by the new one


def test_other_thread_count_remeasures(cache, counted):
    get_profile(progress=False)
    path = cache / "profiles" / f"{host_name()}.json"
    d = json.loads(path.read_text())
    d["versions"]["threads"] = str(torch.get_num_threads() + 7)
    path.write_text(json.dumps(d))
    with pytest.warns(ProfileCacheWarning, match="threads"):
        get_profile(progress=False)
    assert len(counted) == 2


def test_other_decode_activations_remeasure(cache, counted):
    """The GGUF GEMV rates depend on the decode activations (int8 loops or bf16): a profile holds for
    the mode it was measured in; one from before the mode was recorded counts as bf16."""
    get_profile(progress=False)
    path = cache / "profiles" / f"{host_name()}.json"
    d = json.loads(path.read_text())
    assert d["versions"]["decode_act"] == profile.decode_act()
    other = "int8" if profile.decode_act() == "bf16" else "bf16"
    d["versions"]["decode_act"] = other
    path.write_text(json.dumps(d))
    with pytest.warns(ProfileCacheWarning, match=f"measured with {other} decode activations"):
        get_profile(progress=False)
    assert len(counted) == 2
    d = json.loads(path.read_text())
    del d["versions"]["decode_act"]
    path.write_text(json.dumps(d))
    get_profile(progress=False)
    assert len(counted) == (2 if profile.decode_act() == "bf16" else 3)


def test_save_is_atomic_on_failure(cache, counted, monkeypatch):
    prof = get_profile(progress=False)
    path = cache / "profiles" / f"{host_name()}.json"
    before = path.read_text()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        profile.save(prof)
    assert path.read_text() == before  # the old profile is intact
    assert [f.name for f in path.parent.iterdir()] == [path.name]


@pytest.mark.gpu
def test_real_gpu_profile(tiny):
    prof = measure(inventory(), progress=False, sizes=tiny)
    gpu = prof.devices["cuda:0"]
    _check(gpu.h2d_pinned, "B/s")
    _check(gpu.gemm_flops["bf16"], "FLOP/s")
