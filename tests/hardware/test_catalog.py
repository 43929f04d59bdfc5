from __future__ import annotations

import pytest

from hetero.errors import HeteroError
from hetero.hardware.catalog import entries, gpu_by_model, resolve
from hetero.hardware.types import HardwareSpec

REQUIRED = ["h200", "h100sxm", "h100pcie", "a100-40g", "a100-80g", "l4", "t4", "rtx4090", "rtx3090",
            "m2max", "m3max", "server", "laptop16g", "nvme", "sata", "pcie3x16", "pcie4x16", "pcie5x16",
            "nvlink4", "1gbe", "10gbe", "100gbe"]


def test_catalog_has_the_required_parts_each_with_a_source():
    parts = entries()
    for name in REQUIRED:
        assert name in parts, name
    for p in parts.values():
        assert p.source, p.name
        assert p.bandwidth > 0, p.name
        if p.kind == "gpu":
            assert p.memory_bytes > 0 and p.peak_flops.get("fp32", 0) > 0


def test_dense_peaks_are_half_the_sparse_datasheet_figure():
    # H100 SXM datasheet: BF16 1,979 TFLOPS with sparsity -> 989.5 dense
    assert entries()["h100sxm"].peak_flops["bf16"] == pytest.approx(989e12, rel=0.01)
    assert "bf16" not in entries()["t4"].peak_flops  # Turing has no bf16


def test_compose_gpu_ram_disk():
    spec = resolve("catalog:rtx4090+ram64g+nvme")
    assert [d.name for d in spec.devices] == ["cpu", "cuda:0", "disk"]
    assert spec.device("cpu").memory_bytes == 64 << 30
    assert spec.device("cuda:0").memory_bytes == 24 * 10**9
    assert spec.device("cuda:0").bandwidth == pytest.approx(1008e9)
    assert spec.device("disk").bandwidth == pytest.approx(7.45e9)
    assert spec.link("cpu", "cuda:0").kind == "pcie4x16"
    assert spec.link("disk", "cpu") is not None
    assert spec.source == "catalog:rtx4090+ram64g+nvme"
    assert resolve("rtx4090+ram64g+nvme") == spec  # the prefix is optional


def test_lone_gpu_implies_host_ram_and_disk():
    spec = resolve("h100sxm")
    cpu = spec.device("cpu")
    assert cpu.memory_bytes == entries()["server"].memory_bytes
    assert cpu.peak_flops["fp32"] > 0
    assert spec.device("disk").kind == "disk"
    assert spec.link("cpu", "cuda:0").kind == "pcie5x16"


def test_several_gpus_and_link_override():
    spec = resolve("2xh100sxm+pcie4x16+sata")
    assert [d.name for d in spec.compute_devices()] == ["cpu", "cuda:0", "cuda:1"]
    assert spec.link("cuda:0", "cuda:1").kind == "nvlink4"
    assert spec.link("cpu", "cuda:1").bandwidth == pytest.approx(31.5e9)
    assert spec.device("disk").bandwidth == pytest.approx(0.56e9)


def test_unified_memory_machine():
    spec = resolve("m3max")
    mps = spec.device("mps")
    assert mps.shares_memory_with == "cpu"
    assert mps.memory_bytes == spec.device("cpu").memory_bytes == 128 << 30
    assert resolve("m2max+ram32g").device("mps").memory_bytes == 32 << 30


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(HeteroError) as e:
        resolve("catalog:rtx9999+ram64g")
    msg = str(e.value)
    assert "rtx9999" in msg and "rtx4090" in msg and "h200" in msg and "\n" not in msg


@pytest.mark.parametrize("bad", ["", "catalog:", "desktop+server", "rtx4090+10gbe", "ram64g"])
def test_bad_compositions_are_errors(bad):
    with pytest.raises(HeteroError):
        resolve(bad)


def test_composed_spec_round_trips_through_json():
    spec = resolve("2xa100-80g+ram512g")
    assert HardwareSpec.from_dict(spec.to_dict()) == spec


def test_gpu_by_model_matches_torch_names():
    assert gpu_by_model("NVIDIA H100 80GB HBM3").name == "h100sxm"
    assert gpu_by_model("NVIDIA H100 PCIe").name == "h100pcie"
    assert gpu_by_model("NVIDIA H200").name == "h200"
    assert gpu_by_model("NVIDIA GeForce RTX 4090").name == "rtx4090"
    assert gpu_by_model("Tesla T4").name == "t4"
    assert gpu_by_model("Some Future GPU") is None
