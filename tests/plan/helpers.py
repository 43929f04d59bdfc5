"""Toy models and machines with round numbers, so that expected plans can be worked out by hand."""
from __future__ import annotations

from hetero.hardware.profile import PROFILE_VERSION
from hetero.hardware.types import (DeviceProfile, DeviceSpec, HardwareSpec, LinkSpec, Measurement,
                                   Profile)
from hetero.model.hf import spec_from_config
from hetero.model.spec import ModelSpec

MB = 10**6


def toy_spec(layers: int = 2, hidden: int = 64, ffn: int = 128, heads: int = 4, kv_heads: int = 2,
             vocab: int = 256, tied: bool = False, name: str = "toy") -> ModelSpec:
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=hidden,
               intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=4096,
               rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied)
    return spec_from_config(cfg, source=f"test:{name}", fmt="synthetic", name=name)


def _m(x: float, unit: str) -> Measurement:
    return Measurement(median=x, min=x, max=x, unit=unit)


def cpu_machine(ram: int = 8 << 30, disk: int = 100 << 30) -> HardwareSpec:
    """This machine as DESIGN.md measured it: 2 Zen 4 cores, ~730 MB/s O_DIRECT."""
    return HardwareSpec(
        host="toy-cpu",
        devices=(DeviceSpec("cpu", "cpu", memory_bytes=ram, bandwidth=30e9,
                            peak_flops={"fp32": 138e9, "bf16": 386e9}),
                 DeviceSpec("disk", "disk", memory_bytes=disk, bandwidth=730e6 / 0.85)),
        links=(LinkSpec("cpu", "disk", 730e6),), source="test")


def cpu_profile() -> Profile:
    """Measured-style figures of this machine (DESIGN.md): GEMM bf16 386 GFLOP/s, fp32 138; GEMV ~10 GB/s."""
    gemm = {"fp32": _m(138e9, "FLOP/s"), "bf16": _m(386e9, "FLOP/s"), "int8": _m(300e9, "FLOP/s"),
            "int4": _m(200e9, "FLOP/s")}
    gemv = {p: _m(10e9, "B/s") for p in ("fp32", "bf16", "int8", "int4")}
    dev = DeviceProfile("cpu", gemm_flops=gemm, gemv_bandwidth=gemv, mem_bandwidth=_m(27e9, "B/s"),
                        op_overhead=_m(2e-6, "s"))
    return Profile(host="toy-cpu", version=PROFILE_VERSION, versions={}, devices={"cpu": dev},
                   disk_direct=_m(730e6, "B/s"), disk_cached=_m(8e9, "B/s"))


def gpu_machine(vram: int = 1 << 30, ram: int = 8 << 30, gpus: int = 1, disk: bool = True) -> HardwareSpec:
    """A small desktop: 30 GB/s CPU, GPUs with 500 GB/s and 50 TFLOP/s, PCIe at 25 GB/s, 2 GB/s disk."""
    devs = [DeviceSpec("cpu", "cpu", memory_bytes=ram, bandwidth=30e9,
                       peak_flops={"fp32": 500e9, "bf16": 1e12})]
    links = []
    for i in range(gpus):
        devs.append(DeviceSpec(f"cuda:{i}", "cuda", memory_bytes=vram, bandwidth=500e9,
                               peak_flops={"fp32": 20e12, "bf16": 50e12, "fp16": 50e12, "int8": 100e12}))
        links.append(LinkSpec("cpu", f"cuda:{i}", 25e9, latency_s=10e-6))
    if disk:
        devs.append(DeviceSpec("disk", "disk", memory_bytes=100 << 30, bandwidth=2e9))
        links.append(LinkSpec("cpu", "disk", 2e9))
    return HardwareSpec(host="toy-gpu", devices=tuple(devs), links=tuple(links), source="test")
