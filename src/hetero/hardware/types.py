"""The data model of hardware: what devices exist (HardwareSpec) and how fast they measured (Profile).

These are plain frozen dataclasses with a JSON round trip. The planner and the cost model consume
them and never probe hardware themselves; inventory.py, profile.py and catalog.py produce them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DeviceSpec:
    name: str                      # "cpu", "cuda:0", "disk" — the key used in budgets and plans
    kind: str                      # cpu | cuda | mps | xpu | disk
    memory_bytes: int              # capacity (RAM, VRAM, or free disk bytes)
    bandwidth: float = 0.0         # bytes/s: memory bandwidth (cpu/gpu) or sequential read (disk)
    peak_flops: dict[str, float] = field(default_factory=dict)  # precision -> dense FLOP/s
    model: str = ""                # CPU or GPU model string
    cores: int = 0                 # physical cores (cpu) or SMs (gpu)
    threads: int = 0               # usable threads (cpu)
    features: tuple[str, ...] = () # ISA features (avx2, avx512f, avx512_bf16, avx512_vnni, amx, neon)
    compute_capability: str = ""   # cuda only, e.g. "9.0"
    available_bytes: int = 0       # free right now (RAM available), 0 if unknown
    caches: dict[str, int] = field(default_factory=dict)  # "L1d", "L2", "L3" -> bytes
    source: str = ""               # "measured here" or the datasheet it comes from
    shares_memory_with: str = ""   # unified memory (Apple mps): the device whose RAM this one uses

    @property
    def computes(self) -> bool:
        return self.kind != "disk"


@dataclass(frozen=True)
class LinkSpec:
    src: str                       # device name, e.g. "cpu"
    dst: str                       # e.g. "cuda:0" or "disk"
    bandwidth: float               # bytes/s, one direction
    latency_s: float = 0.0
    kind: str = ""                 # pcie4x16, nvlink4, 10gbe, ...


@dataclass(frozen=True)
class HardwareSpec:
    host: str
    devices: tuple[DeviceSpec, ...]
    links: tuple[LinkSpec, ...] = ()
    source: str = "this"           # "this" (inventoried here) or "catalog:SPEC"

    def device(self, name: str) -> DeviceSpec:
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(f"no device {name!r} in {self.host}; have: {', '.join(d.name for d in self.devices)}")

    def compute_devices(self) -> list[DeviceSpec]:
        return [d for d in self.devices if d.computes]

    def link(self, src: str, dst: str) -> LinkSpec | None:
        for ln in self.links:
            if {ln.src, ln.dst} == {src, dst}:
                return ln
        return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HardwareSpec":
        devices = tuple(
            DeviceSpec(**{**x, "features": tuple(x.get("features", ()))}) for x in d["devices"]
        )
        links = tuple(LinkSpec(**x) for x in d.get("links", ()))
        return cls(host=d["host"], devices=devices, links=links, source=d.get("source", "this"))


@dataclass(frozen=True)
class Measurement:
    """One measured figure with its spread over repeats."""
    median: float
    min: float
    max: float
    unit: str                      # "B/s", "FLOP/s", "s"
    repeats: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DeviceProfile:
    """Measured coefficients of one compute device, keyed by precision where they depend on it."""
    device: str
    gemm_flops: dict[str, Measurement] = field(default_factory=dict)      # prefill-shaped matmul
    gemv_bandwidth: dict[str, Measurement] = field(default_factory=dict)  # decode: weight bytes/s streamed
    mem_bandwidth: Measurement | None = None                              # large copy, read+write bytes counted (STREAM Copy)
    op_overhead: Measurement | None = None                                # fixed seconds per op/launch
    h2d_pinned: Measurement | None = None                                 # host -> device, cuda only
    h2d_pageable: Measurement | None = None
    mem_read_bandwidth: Measurement | None = None                         # read-only stream (a reduction), B/s
    # batched decode: FLOP/s of the small-M row kernels (Sizes.rows_m activation rows, the engine's
    # `rows` path), per precision; what each extra sequence of a batched step costs in compute
    gemm_rows: dict[str, Measurement] = field(default_factory=dict)
    eager_bandwidth: Measurement | None = None                            # elementwise op into fresh pages, B/s (cpu)


@dataclass(frozen=True)
class Profile:
    host: str
    version: int                                   # schema version; older cached profiles are re-measured
    versions: dict[str, str]                       # torch, python, hetero versions it was measured with
    devices: dict[str, DeviceProfile]              # device name -> profile
    disk_direct: Measurement | None = None         # O_DIRECT sequential read, B/s
    disk_cached: Measurement | None = None         # page-cache read, B/s
    calibration: dict[str, float] = field(default_factory=dict)  # fitted corrections (bench --calibrate)
    mode: str = "quick"                            # quick | full
    measured_at: str = ""                          # ISO timestamp

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Profile":
        def m(x: dict[str, Any] | None) -> Measurement | None:
            return Measurement(**x) if x else None

        devices = {}
        for name, p in d["devices"].items():
            devices[name] = DeviceProfile(
                device=p["device"],
                gemm_flops={k: Measurement(**v) for k, v in p.get("gemm_flops", {}).items()},
                gemv_bandwidth={k: Measurement(**v) for k, v in p.get("gemv_bandwidth", {}).items()},
                mem_bandwidth=m(p.get("mem_bandwidth")),
                op_overhead=m(p.get("op_overhead")),
                h2d_pinned=m(p.get("h2d_pinned")),
                h2d_pageable=m(p.get("h2d_pageable")),
                mem_read_bandwidth=m(p.get("mem_read_bandwidth")),
                gemm_rows={k: Measurement(**v) for k, v in p.get("gemm_rows", {}).items()},
                eager_bandwidth=m(p.get("eager_bandwidth")),
            )
        return cls(
            host=d["host"], version=d["version"], versions=d.get("versions", {}), devices=devices,
            disk_direct=m(d.get("disk_direct")), disk_cached=m(d.get("disk_cached")),
            calibration=d.get("calibration", {}), mode=d.get("mode", "quick"),
            measured_at=d.get("measured_at", ""),
        )
