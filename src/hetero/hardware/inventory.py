"""What is here: CPU (model, cores, ISA, caches), RAM, the GPUs torch sees, the disk under the cache
dir, and the links between them, as a HardwareSpec.

Inventory only reads what the OS and torch report; it never runs a benchmark. Bandwidths come from
the cached measured profile when one exists (else a nominal figure or 0, meaning unknown).
"""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import socket
from pathlib import Path
from typing import Any

from hetero.hardware.types import DeviceSpec, HardwareSpec, LinkSpec
from hetero.paths import cache_dir

# ISA features that change which kernels are fast; names as /proc/cpuinfo spells them.
_FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16",
             "amx_bf16", "amx_int8", "amx_tile", "avx_vnni")

# Nominal PCIe gen4 x16 (PCI-SIG: 16 GT/s x 16 lanes x 128/130 / 8), one direction; used for a GPU
# link until the profile measures host->device copies.
PCIE4_X16 = 31.5e9


def host_name() -> str:
    return socket.gethostname() or "localhost"


def _cpuinfo() -> dict[str, str]:
    """The first processor block of /proc/cpuinfo (Linux); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            out[k.strip()] = v.strip()
    return out


def cpu_features(flags: str | None = None) -> tuple[str, ...]:
    """ISA features that matter for our kernels; `flags` is a /proc/cpuinfo flags line (for tests)."""
    if flags is None:
        flags = _cpuinfo().get("flags", "")
    have = set(flags.split())
    feats = [f for f in _FEATURES if f in have]
    if any(f.startswith("amx") for f in feats):
        feats.append("amx")
    if platform.machine().lower() in ("arm64", "aarch64"):
        feats.append("neon")  # mandatory on ARMv8
    return tuple(dict.fromkeys(feats))


def cpu_caches(root: str = "/sys/devices/system/cpu/cpu0/cache") -> dict[str, int]:
    """Per-core L1d/L2 and shared L3 sizes in bytes, from sysfs."""
    out: dict[str, int] = {}
    for d in sorted(Path(root).glob("index*")):
        try:
            level = (d / "level").read_text().strip()
            kind = (d / "type").read_text().strip()
            size = (d / "size").read_text().strip()
        except OSError:
            continue
        if kind == "Instruction":
            continue
        m = re.fullmatch(r"(\d+)([KMG]?)", size)
        if not m:
            continue
        mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)]
        out[f"L{level}d" if kind == "Data" else f"L{level}"] = int(m.group(1)) * mult
    return out


def cpu_peak_flops(cores: int, ghz: float, features: tuple[str, ...]) -> dict[str, float]:
    """A nominal dense peak from the ISA: FLOP per cycle per core times cores times clock.

    Two 256-bit FMA pipes (AVX2, and Zen 4's double-pumped AVX-512) give 32 fp32 FLOP/cycle;
    bf16 dot products double that, VNNI quadruples it for int8. Measured rates live in the Profile.
    """
    if not cores or not ghz:
        return {}
    fp32 = 32.0 if ("avx2" in features or "avx512f" in features or "neon" in features) else 8.0
    base = cores * ghz * 1e9
    out = {"fp32": fp32 * base}
    bf16 = 16 * fp32 if "amx" in features else (2 * fp32 if "avx512_bf16" in features else fp32)
    out["bf16"] = bf16 * base
    out["fp16"] = (2 * fp32 if "avx512_fp16" in features else fp32) * base
    int8 = 32 * fp32 if "amx" in features else (
        4 * fp32 if ("avx512_vnni" in features or "avx_vnni" in features) else 2 * fp32)
    out["int8"] = int8 * base
    return out


def _physical_cores() -> int:
    try:
        import psutil
        n = psutil.cpu_count(logical=False)
        if n:
            return int(n)
    except Exception:
        pass
    return os.cpu_count() or 1


def _ram() -> tuple[int, int]:
    try:
        import psutil
        vm = psutil.virtual_memory()
        return int(vm.total), int(vm.available)
    except Exception:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return int(pages), 0


def _cached_profile(host: str) -> dict[str, Any] | None:
    """The cached profile as raw JSON, without measuring; None when absent or unreadable."""
    path = cache_dir() / "profiles" / f"{host}.json"
    try:
        d = json.loads(path.read_text())
        return d if isinstance(d, dict) else None
    except (OSError, ValueError):
        return None


def _median(d: dict[str, Any] | None, *keys: str) -> float:
    for k in keys:
        if not isinstance(d, dict):
            return 0.0
        d = d.get(k)
    return float(d.get("median", 0.0)) if isinstance(d, dict) else 0.0


def _cpu_device(prof: dict[str, Any] | None) -> DeviceSpec:
    import torch

    info = _cpuinfo()
    feats = cpu_features(info.get("flags", ""))
    cores = _physical_cores()
    threads = torch.get_num_threads()
    try:
        ghz = float(info.get("cpu MHz", 0)) / 1000
    except ValueError:
        ghz = 0.0
    total, avail = _ram()
    model = info.get("model name") or platform.processor() or platform.machine()
    # the measured copy rate when we have it; the planner treats 0 as unknown
    bw = _median(prof, "devices", "cpu", "mem_bandwidth")
    return DeviceSpec(
        name="cpu", kind="cpu", memory_bytes=total, available_bytes=avail, bandwidth=bw,
        peak_flops=cpu_peak_flops(min(cores, threads), ghz, feats), model=model, cores=cores,
        threads=threads, features=feats, caches=cpu_caches(), source="measured here" if bw else "inventory",
    )


def _cuda_devices(prof: dict[str, Any] | None) -> tuple[list[DeviceSpec], list[LinkSpec]]:
    import torch

    if not torch.cuda.is_available():
        return [], []
    from hetero.hardware.catalog import gpu_by_model

    devs, links = [], []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        name = f"cuda:{i}"
        try:
            free, total = torch.cuda.mem_get_info(i)
        except Exception:
            free, total = 0, int(p.total_memory)
        sheet = gpu_by_model(p.name)  # spec-sheet peaks for a known model, else unknown
        bw = _median(prof, "devices", name, "mem_bandwidth") or (sheet.bandwidth if sheet else 0.0)
        devs.append(DeviceSpec(
            name=name, kind="cuda", memory_bytes=int(total), available_bytes=int(free), bandwidth=bw,
            peak_flops=dict(sheet.peak_flops) if sheet else {}, model=p.name,
            cores=int(getattr(p, "multi_processor_count", 0)),
            compute_capability=f"{p.major}.{p.minor}", source="inventory",
        ))
        h2d = _median(prof, "devices", name, "h2d_pinned") or PCIE4_X16
        links.append(LinkSpec(src="cpu", dst=name, bandwidth=h2d, latency_s=10e-6, kind="pcie"))
    return devs, links


def _other_backends(ram_total: int) -> list[DeviceSpec]:
    """Apple mps (unified memory: shares the host RAM) and Intel xpu when torch has them."""
    import torch

    out = []
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append(DeviceSpec(name="mps", kind="mps", memory_bytes=ram_total, model="Apple GPU",
                              source="inventory", shares_memory_with="cpu"))
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        for i in range(xpu.device_count()):
            p = xpu.get_device_properties(i)
            out.append(DeviceSpec(name=f"xpu:{i}", kind="xpu", memory_bytes=int(p.total_memory),
                                  model=p.name, source="inventory"))
    return out


def _mount_source(path: Path) -> str:
    """The block device holding `path` (longest matching mount point in /proc/mounts)."""
    best, src = "", ""
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, src = parts[1], parts[0]
    except OSError:
        pass
    return src


def _disk_device(prof: dict[str, Any] | None) -> DeviceSpec:
    root = cache_dir()
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent  # the cache dir may not exist yet: its nearest existing parent
    free = shutil.disk_usage(probe).free
    bw = _median(prof, "disk_direct")
    return DeviceSpec(name="disk", kind="disk", memory_bytes=int(free), available_bytes=int(free),
                      bandwidth=bw, model=_mount_source(probe.resolve()),
                      source="measured here" if bw else "inventory")


def inventory() -> HardwareSpec:
    """The devices of this machine and their links. Works without any GPU."""
    host = host_name()
    prof = _cached_profile(host)
    cpu = _cpu_device(prof)
    gpus, links = _cuda_devices(prof)
    disk = _disk_device(prof)
    links.append(LinkSpec(src="cpu", dst="disk", bandwidth=disk.bandwidth, kind="disk"))
    devices = (cpu, *gpus, *_other_backends(cpu.memory_bytes), disk)
    return HardwareSpec(host=host, devices=devices, links=tuple(links), source="this")
