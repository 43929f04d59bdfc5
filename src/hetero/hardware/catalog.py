"""Spec-sheet hardware for what-if plans on machines we do not own.

Every part names its source. Peak FLOP/s are dense (NVIDIA datasheets print tensor-core figures
"with sparsity"; we halve those). Bandwidths are bytes/s, links one direction. Machines are composed
from parts with "+": `catalog:rtx4090+ram64g+nvme`, `2xh100sxm+nvlink4`, `m3max`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from hetero.errors import HeteroError
from hetero.hardware.types import DeviceSpec, HardwareSpec, LinkSpec

G, T = 1e9, 1e12
GiB = 1 << 30


@dataclass(frozen=True)
class Part:
    name: str                      # the catalog key, e.g. "rtx4090"
    kind: str                      # gpu | cpu | machine | disk | link
    title: str
    source: str                    # the vendor datasheet (or how a figure was derived from it)
    memory_bytes: int = 0          # VRAM, default RAM of a cpu/machine, disk capacity
    bandwidth: float = 0.0         # memory / sequential read / link bandwidth, B/s
    peak_flops: dict[str, float] = field(default_factory=dict)
    cores: int = 0
    features: tuple[str, ...] = ()
    link: str = ""                 # gpu: default host link; machine: unused
    host: str = ""                 # gpu: the host a lone GPU implies
    peer_link: str = ""            # gpu: link between GPUs of a multi-GPU box, when any
    unified: bool = False          # machine: the GPU shares the RAM (Apple)


def _gpu(name, title, source, mem_gb, bw, fp32, bf16, fp16, int8, int4=0.0, *, link="pcie4x16",
         host="desktop", peer="", cores=0) -> Part:
    flops = {"fp32": fp32, "bf16": bf16, "fp16": fp16, "int8": int8}
    if int4:
        flops["int4"] = int4
    return Part(name, "gpu", title, source, memory_bytes=int(mem_gb * G), bandwidth=bw,
                peak_flops={k: v for k, v in flops.items() if v}, cores=cores, link=link, host=host,
                peer_link=peer)


_NV = "NVIDIA {} datasheet"
_PARTS: list[Part] = [
    # --- GPUs (tensor-core bf16/fp16/int8 dense = datasheet sparse figure / 2) ---
    _gpu("h200", "NVIDIA H200 SXM 141GB", _NV.format("H200 Tensor Core GPU"), 141, 4.8 * T,
         67 * T, 989 * T, 989 * T, 1979 * T, link="pcie5x16", host="server", peer="nvlink4", cores=132),
    _gpu("h100sxm", "NVIDIA H100 SXM 80GB", _NV.format("H100 Tensor Core GPU"), 80, 3.35 * T,
         67 * T, 989 * T, 989 * T, 1979 * T, link="pcie5x16", host="server", peer="nvlink4", cores=132),
    _gpu("h100pcie", "NVIDIA H100 PCIe 80GB", _NV.format("H100 Tensor Core GPU"), 80, 2.0 * T,
         51 * T, 756 * T, 756 * T, 1513 * T, link="pcie5x16", host="server", cores=114),
    _gpu("a100-40g", "NVIDIA A100 SXM 40GB", _NV.format("A100 Tensor Core GPU"), 40, 1555 * G,
         19.5 * T, 312 * T, 312 * T, 624 * T, 1248 * T, host="server", peer="nvlink3", cores=108),
    _gpu("a100-80g", "NVIDIA A100 SXM 80GB", _NV.format("A100 Tensor Core GPU"), 80, 2039 * G,
         19.5 * T, 312 * T, 312 * T, 624 * T, 1248 * T, host="server", peer="nvlink3", cores=108),
    _gpu("l4", "NVIDIA L4 24GB", _NV.format("L4 Tensor Core GPU"), 24, 300 * G,
         30.3 * T, 121 * T, 121 * T, 242.5 * T, host="server", cores=58),
    # Turing has no bf16: the planner must not pick it there
    _gpu("t4", "NVIDIA T4 16GB", _NV.format("Tesla T4"), 16, 320 * G,
         8.1 * T, 0.0, 65 * T, 130 * T, 260 * T, link="pcie3x16", host="server", cores=40),
    # GeForce: fp16/bf16 with fp32 accumulate, dense (Ada / Ampere GA102 whitepapers)
    _gpu("rtx4090", "NVIDIA GeForce RTX 4090 24GB", "NVIDIA Ada Lovelace architecture whitepaper",
         24, 1008 * G, 82.6 * T, 165.2 * T, 165.2 * T, 660.6 * T, 1321.2 * T, cores=128),
    _gpu("rtx3090", "NVIDIA GeForce RTX 3090 24GB", "NVIDIA Ampere GA102 GPU architecture whitepaper",
         24, 936 * G, 35.6 * T, 71 * T, 71 * T, 284 * T, 568 * T, cores=82),
    # --- CPUs: peak = cores x base clock x FLOP/cycle (Zen 4: 32 fp32, 64 bf16, 128 int8 VNNI) ---
    Part("desktop", "cpu", "AMD Ryzen 9 7950X, 2-channel DDR5-5200",
         "AMD Ryzen 9 7950X product page (16 cores, 4.5 GHz base); DDR5-5200 x 2 channels x 8 B",
         memory_bytes=64 * GiB, bandwidth=83.2 * G, cores=16,
         peak_flops={"fp32": 16 * 4.5 * 32 * G, "bf16": 16 * 4.5 * 64 * G,
                     "fp16": 16 * 4.5 * 32 * G, "int8": 16 * 4.5 * 128 * G},
         features=("avx2", "avx512f", "avx512_bf16", "avx512_vnni")),
    Part("server", "cpu", "2x AMD EPYC 9654 (Genoa), 24-channel DDR5-4800",
         "AMD EPYC 9654 product page (96 cores, 2.4 GHz base, 12 ch DDR5-4800 = 460.8 GB/s per socket)",
         memory_bytes=768 * GiB, bandwidth=921.6 * G, cores=192,
         peak_flops={"fp32": 192 * 2.4 * 32 * G, "bf16": 192 * 2.4 * 64 * G,
                     "fp16": 192 * 2.4 * 32 * G, "int8": 192 * 2.4 * 128 * G},
         features=("avx2", "avx512f", "avx512_bf16", "avx512_vnni")),
    # --- whole machines ---
    Part("laptop16g", "machine", "Laptop: Intel Core i7-1260P, 16 GB LPDDR5-5200",
         "Intel ARK i7-1260P (4P+8E cores, 76.8 GB/s max memory bandwidth); peak from 4 P-cores x "
         "4.7 GHz x 32 + 8 E-cores x 3.4 GHz x 16 FLOP/cycle", memory_bytes=16 * GiB,
         bandwidth=76.8 * G, cores=12, peak_flops={"fp32": 1037 * G, "bf16": 1037 * G,
                                                  "fp16": 1037 * G, "int8": 2074 * G},
         features=("avx2", "fma", "avx_vnni")),
    Part("m2max", "machine", "Apple M2 Max, 38-core GPU, 96 GB unified memory",
         "Apple newsroom 'M2 Pro and M2 Max' (Jan 2023): 400 GB/s, up to 96 GB; GPU fp32 = 38 cores x "
         "128 ALUs x 2 x 1.398 GHz", memory_bytes=96 * GiB, bandwidth=400 * G, cores=12,
         peak_flops={"fp32": 13.6 * T, "fp16": 13.6 * T, "bf16": 13.6 * T}, features=("neon",),
         unified=True),
    Part("m3max", "machine", "Apple M3 Max, 40-core GPU, 128 GB unified memory",
         "Apple newsroom 'M3 family' (Oct 2023): 400 GB/s, up to 128 GB; GPU fp32 = 40 cores x "
         "128 ALUs x 2 x 1.6 GHz", memory_bytes=128 * GiB, bandwidth=400 * G, cores=16,
         peak_flops={"fp32": 16.4 * T, "fp16": 16.4 * T, "bf16": 16.4 * T}, features=("neon",),
         unified=True),
    # --- disks (sequential read) ---
    Part("nvme", "disk", "NVMe Gen4 SSD (Samsung 990 PRO 2TB)", "Samsung 990 PRO datasheet: 7,450 MB/s",
         memory_bytes=2 * 10**12, bandwidth=7.45 * G),
    Part("nvme3", "disk", "NVMe Gen3 SSD (Samsung 970 EVO Plus 1TB)",
         "Samsung 970 EVO Plus datasheet: 3,500 MB/s", memory_bytes=10**12, bandwidth=3.5 * G),
    Part("sata", "disk", "SATA SSD (Samsung 870 EVO 1TB)", "Samsung 870 EVO datasheet: 560 MB/s",
         memory_bytes=10**12, bandwidth=0.56 * G),
    # --- links, one direction (PCI-SIG: GT/s x 16 lanes x 128/130 / 8) ---
    Part("pcie3x16", "link", "PCIe 3.0 x16", "PCI-SIG PCIe 3.0: 8 GT/s, 128b/130b", bandwidth=15.75 * G),
    Part("pcie4x16", "link", "PCIe 4.0 x16", "PCI-SIG PCIe 4.0: 16 GT/s, 128b/130b", bandwidth=31.5 * G),
    Part("pcie5x16", "link", "PCIe 5.0 x16", "PCI-SIG PCIe 5.0: 32 GT/s, 128b/130b", bandwidth=63.0 * G),
    Part("nvlink3", "link", "NVLink 3 (A100)", "NVIDIA A100 datasheet: 600 GB/s bidirectional",
         bandwidth=300 * G),
    Part("nvlink4", "link", "NVLink 4 (H100/H200)", "NVIDIA H100 datasheet: 900 GB/s bidirectional",
         bandwidth=450 * G),
    Part("1gbe", "link", "1 Gigabit Ethernet", "IEEE 802.3ab", bandwidth=0.125 * G),
    Part("10gbe", "link", "10 Gigabit Ethernet", "IEEE 802.3ae", bandwidth=1.25 * G),
    Part("100gbe", "link", "100 Gigabit Ethernet", "IEEE 802.3ba", bandwidth=12.5 * G),
]
_BY_NAME = {p.name: p for p in _PARTS}
_RAM = re.compile(r"ram(\d+)([gt])")
_COUNT = re.compile(r"(\d+)x(.+)")
_LAT = {"pcie": 10e-6, "nvlink": 2e-6, "gbe": 50e-6}


def entries() -> dict[str, Part]:
    """Every catalog part by name (GPUs, CPUs, whole machines, disks, links)."""
    return dict(_BY_NAME)


def gpu_by_model(model: str) -> Part | None:
    """The catalog GPU whose name matches a torch device name ("NVIDIA H100 80GB HBM3" -> h100sxm)."""
    m = model.lower().replace(" ", "")
    for key, needle in (("h200", "h200"), ("h100pcie", "h100pcie"), ("h100sxm", "h100"),
                        ("a100-40g", "a100-sxm4-40gb"), ("a100-80g", "a100"), ("l4", "nvidial4"),
                        ("t4", "teslat4"), ("rtx4090", "4090"), ("rtx3090", "3090")):
        if needle in m:
            return _BY_NAME[key]
    return None


def _unknown(token: str) -> HeteroError:
    return HeteroError(f"unknown catalog part {token!r}; known: {', '.join(_BY_NAME)}, ramNg, NxGPU "
                       f"(e.g. catalog:rtx4090+ram64g+nvme)")


def _link(part: Part, src: str, dst: str) -> LinkSpec:
    lat = next((v for k, v in _LAT.items() if k in part.name), 0.0)
    return LinkSpec(src=src, dst=dst, bandwidth=part.bandwidth, latency_s=lat, kind=part.name)


def resolve(name: str) -> HardwareSpec:
    """A HardwareSpec composed from catalog parts: "catalog:rtx4090+ram64g+nvme" or without prefix.

    Devices are named "cpu", "cuda:N" (or "mps" on Apple), "disk", like an inventoried machine.
    A lone GPU implies its default host (desktop or server CPU with its default RAM); no disk part
    implies "nvme".
    """
    spec = name[len("catalog:"):] if name.startswith("catalog:") else name
    tokens = [t for t in spec.lower().split("+") if t]
    if not tokens:
        raise _unknown(name)
    gpus: list[Part] = []
    host = disk = host_link = peer_link = None
    ram: int | None = None
    for tok in tokens:
        count, key = 1, tok
        if (m := _RAM.fullmatch(tok)):
            ram = int(m.group(1)) * (GiB if m.group(2) == "g" else 1 << 40)
            continue
        if (m := _COUNT.fullmatch(tok)) and m.group(2) in _BY_NAME:
            count, key = int(m.group(1)), m.group(2)
        part = _BY_NAME.get(key)
        if part is None:
            raise _unknown(tok)
        if part.kind == "gpu":
            gpus.extend([part] * count)
        elif part.kind in ("cpu", "machine"):
            if host is not None:
                raise HeteroError(f"{name!r} names two hosts ({host.name}, {part.name}); pick one")
            host = part
        elif part.kind == "disk":
            disk = part
        elif part.name.startswith("pcie"):
            host_link = part
        elif part.name.startswith("nvlink"):
            peer_link = part
        else:
            raise HeteroError(f"{part.name} links hosts to each other; a single machine has no use for it "
                              "(several machines come with distributed plans)")
    if host is None:
        host = _BY_NAME[gpus[0].host] if gpus else None
        if host is None:
            raise HeteroError(f"{name!r} has no GPU, CPU or machine; known: {', '.join(_BY_NAME)}")
    disk = disk or _BY_NAME["nvme"]
    ram_bytes = ram if ram is not None else host.memory_bytes

    cpu = DeviceSpec(name="cpu", kind="cpu", memory_bytes=ram_bytes, bandwidth=host.bandwidth,
                     peak_flops={} if host.unified else dict(host.peak_flops), model=host.title,
                     cores=host.cores, threads=host.cores, features=host.features, source=host.source)
    devices: list[DeviceSpec] = [cpu]
    links: list[LinkSpec] = []
    if host.unified:
        # Apple: one pool of memory; the GPU computes, the CPU row holds the RAM
        devices.append(DeviceSpec(name="mps", kind="mps", memory_bytes=ram_bytes, bandwidth=host.bandwidth,
                                  peak_flops=dict(host.peak_flops), model=host.title, source=host.source,
                                  shares_memory_with="cpu"))
        links.append(LinkSpec(src="cpu", dst="mps", bandwidth=host.bandwidth, kind="unified"))
    for i, g in enumerate(gpus):
        dev = f"cuda:{i}"
        devices.append(DeviceSpec(name=dev, kind="cuda", memory_bytes=g.memory_bytes, bandwidth=g.bandwidth,
                                  peak_flops=dict(g.peak_flops), model=g.title, cores=g.cores,
                                  source=g.source))
        links.append(_link(host_link or _BY_NAME[g.link], "cpu", dev))
    peer = peer_link or (_BY_NAME[gpus[0].peer_link] if gpus and gpus[0].peer_link else None)
    if peer is not None and len(gpus) > 1:
        for i in range(len(gpus)):
            for j in range(i + 1, len(gpus)):
                links.append(_link(peer, f"cuda:{i}", f"cuda:{j}"))
    devices.append(DeviceSpec(name="disk", kind="disk", memory_bytes=disk.memory_bytes,
                              available_bytes=disk.memory_bytes, bandwidth=disk.bandwidth,
                              model=disk.title, source=disk.source))
    links.append(LinkSpec(src="cpu", dst="disk", bandwidth=disk.bandwidth, kind=disk.name))
    return HardwareSpec(host=spec, devices=tuple(devices), links=tuple(links), source=f"catalog:{spec}")
