from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from hetero.hardware import inventory as inv
from hetero.hardware.types import HardwareSpec


def test_inventory_of_this_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    spec = inv.inventory()
    cpu = spec.device("cpu")
    assert cpu.kind == "cpu" and cpu.memory_bytes > 0 and cpu.threads == torch.get_num_threads()
    assert 0 < cpu.available_bytes <= cpu.memory_bytes
    assert cpu.cores >= 1
    disk = spec.device("disk")
    assert disk.kind == "disk" and disk.memory_bytes > 0
    assert not [d for d in spec.devices if d.kind == "cuda"]  # no GPU: no GPU rows, no error
    assert spec.link("cpu", "disk") is not None
    assert HardwareSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_feature_parsing():
    flags = "fpu sse avx2 fma avx512f avx512_bf16 avx512_vnni amx_tile amx_bf16 foo"
    feats = inv.cpu_features(flags)
    for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx"):
        assert f in feats
    assert "foo" not in feats and "sse" not in feats
    assert inv.cpu_features("fpu sse") in ((), ("neon",))


def test_cache_sizes_from_sysfs(tmp_path):
    for i, (level, kind, size) in enumerate([(1, "Data", "48K"), (1, "Instruction", "32K"),
                                             (2, "Unified", "2048K"), (3, "Unified", "32M")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    assert inv.cpu_caches(str(tmp_path)) == {"L1d": 48 << 10, "L2": 2 << 20, "L3": 32 << 20}


def test_peak_flops_follow_the_isa():
    plain = inv.cpu_peak_flops(2, 2.0, ("avx2",))
    bf16 = inv.cpu_peak_flops(2, 2.0, ("avx2", "avx512f", "avx512_bf16", "avx512_vnni"))
    assert plain["fp32"] == pytest.approx(2 * 2e9 * 32)
    assert bf16["bf16"] == 2 * plain["bf16"]
    assert bf16["int8"] == 2 * plain["int8"]
    assert inv.cpu_peak_flops(0, 2.0, ()) == {}


def test_bandwidths_come_from_the_cached_profile(cache, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    host = inv.host_name()
    (cache / "profiles").mkdir(parents=True)
    (cache / "profiles" / f"{host}.json").write_text(json.dumps({
        "devices": {"cpu": {"mem_bandwidth": {"median": 3.0e10}}},
        "disk_direct": {"median": 7.0e8}}))
    spec = inv.inventory()
    assert spec.device("cpu").bandwidth == 3.0e10
    assert spec.device("disk").bandwidth == 7.0e8
    assert spec.link("cpu", "disk").bandwidth == 7.0e8


def test_a_corrupt_cached_profile_does_not_break_inventory(cache):
    (cache / "profiles").mkdir(parents=True)
    (cache / "profiles" / f"{inv.host_name()}.json").write_text("{not json")
    assert inv.inventory().device("cpu").bandwidth == 0.0


def fake_cuda(monkeypatch, n=2, name="NVIDIA H100 80GB HBM3"):
    """torch.cuda as if n GPUs were present (only the calls inventory makes)."""
    props = SimpleNamespace(name=name, total_memory=80 * 10**9, major=9, minor=0, multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (79 * 10**9, 80 * 10**9))


def test_gpu_branch_with_a_fake_cuda(monkeypatch):
    fake_cuda(monkeypatch)
    spec = inv.inventory()
    names = [d.name for d in spec.devices]
    assert names[:3] == ["cpu", "cuda:0", "cuda:1"] and names[-1] == "disk"
    g = spec.device("cuda:1")
    assert g.kind == "cuda" and g.memory_bytes == 80 * 10**9 and g.available_bytes == 79 * 10**9
    assert g.compute_capability == "9.0" and g.cores == 132
    assert g.peak_flops["bf16"] > 1e14 and g.bandwidth == pytest.approx(3.35e12)  # from the catalog
    link = spec.link("cpu", "cuda:0")
    assert link.kind == "pcie" and link.bandwidth == inv.PCIE4_X16
    assert HardwareSpec.from_dict(spec.to_dict()) == spec


def test_fake_gpu_uses_measured_h2d_when_cached(cache, monkeypatch):
    fake_cuda(monkeypatch, n=1, name="Mystery GPU")
    (cache / "profiles").mkdir(parents=True)
    (cache / "profiles" / f"{inv.host_name()}.json").write_text(json.dumps(
        {"devices": {"cuda:0": {"h2d_pinned": {"median": 2.5e10}, "mem_bandwidth": {"median": 1e12}}}}))
    spec = inv.inventory()
    assert spec.link("cpu", "cuda:0").bandwidth == 2.5e10
    assert spec.device("cuda:0").bandwidth == 1e12
    assert spec.device("cuda:0").peak_flops == {}  # unknown model: no spec-sheet peaks


@pytest.mark.gpu
def test_real_gpu_inventory():
    spec = inv.inventory()
    assert spec.device("cuda:0").memory_bytes > 0
