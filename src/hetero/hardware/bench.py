"""Micro-benchmarks of one compute device: matmul rates (GEMM for prefill, GEMV for decode) per
precision, memory bandwidth, fixed per-op overhead, and host->device copies on CUDA.

Each returns a Measurement over `repeats` timed batches; a batch repeats the op until it lasts at
least `min_time` seconds so that timer resolution and dispatch jitter do not dominate.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

from hetero.hardware.types import Measurement


@dataclass(frozen=True)
class Sizes:
    """Problem sizes and repeat counts; tests pass tiny ones, quick/full mode pick real ones."""
    gemm_m: int = 512              # prompt tokens of a prefill chunk
    gemm_k: int = 2048
    gemm_n: int = 2048
    gemv_bytes: int = 128 << 20    # weight bytes of the decode matvec: well past the last-level cache
    copy_bytes: int = 256 << 20    # per buffer of the bandwidth copy
    disk_bytes: int = 256 << 20    # the probe file for disk reads
    disk_chunk: int = 16 << 20     # bytes per read() call
    repeats: int = 5
    min_time: float = 0.05         # seconds per timed batch
    overhead_iters: int = 2000


QUICK = Sizes()
FULL = Sizes(gemm_m=512, gemm_k=4096, gemm_n=4096, gemv_bytes=256 << 20, copy_bytes=512 << 20,
             disk_bytes=512 << 20, repeats=11, min_time=0.2)


class Backend:
    """How to allocate on and wait for one device; a fake one lets tests drive the CUDA branch."""

    def __init__(self, device: str):
        self.device = device
        self.is_cuda = device.startswith("cuda")

    def sync(self) -> None:
        if self.is_cuda:
            import torch
            torch.cuda.synchronize(self.device)

    def pin(self, t):
        return t.pin_memory()


def backend_for(device: str) -> Backend:
    return Backend(device)


def time_op(fn: Callable[[], object], sync: Callable[[], None], repeats: int, min_time: float) -> list[float]:
    """Seconds per call of `fn`, one value per timed batch."""
    fn()
    sync()  # warm-up: allocator, kernel selection, packing caches
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        dt = time.perf_counter() - t0
        if dt >= min_time or n >= 1 << 20:
            break
        n = max(n * 2, int(n * min_time / max(dt, 1e-9) * 1.1))
    out = [dt / n]
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        out.append((time.perf_counter() - t0) / n)
    return out


def rate(work: float, seconds: list[float], unit: str) -> Measurement:
    """work / time for each batch; median, min, max of those rates."""
    rates = [work / s for s in seconds if s > 0]
    return Measurement(median=statistics.median(rates), min=min(rates), max=max(rates), unit=unit,
                       repeats=len(rates))


def per_call(seconds: list[float]) -> Measurement:
    return Measurement(median=statistics.median(seconds), min=min(seconds), max=max(seconds), unit="s",
                       repeats=len(seconds))


def _int4_weight(n: int, k: int, device: str, group: int):
    """A packed int4 weight [N, K] and its bf16 scales+zeros [K/group, N, 2] for the device's kernel."""
    import torch

    if device == "cpu":
        w = torch.randint(0, 16, (n, k), dtype=torch.int32)
        packed = torch._convert_weight_to_int4pack_for_cpu(w, 1)
        mm = torch._weight_int4pack_mm_for_cpu
    else:
        # the CUDA kernel takes two nibbles per uint8 and an inner-k-tile count of 8
        w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device)
        packed = torch._convert_weight_to_int4pack(w, 8)
        mm = torch._weight_int4pack_mm
    sz = torch.rand(k // group, n, 2, dtype=torch.bfloat16, device=device)
    return lambda x: mm(x, packed, group, sz)


def matmul_op(precision: str, m: int, k: int, n: int, device: str, group: int = 32):
    """A callable computing x[m, k] @ W[n, k]^T at `precision` the way the engine runs it.

    int8 and int4 are weight-only: bf16 activations, quantised weights (torch's packed kernels).
    Returns None when this torch has no such kernel for the device.
    """
    import torch
    import torch.nn.functional as F

    dense = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    try:
        if precision in dense:
            dt = dense[precision]
            x = torch.randn(m, k, dtype=dt, device=device)
            w = torch.randn(n, k, dtype=dt, device=device)
            return lambda: F.linear(x, w)
        x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
        if precision == "int8":
            w8 = torch.randint(-128, 127, (n, k), dtype=torch.int8, device=device)
            s = torch.rand(n, dtype=torch.bfloat16, device=device)
            fn = lambda: torch._weight_int8pack_mm(x, w8, s)  # noqa: E731
        elif precision == "int4":
            mm4 = _int4_weight(n, k, device, group)
            fn = lambda: mm4(x)  # noqa: E731
        else:
            return None
        fn()  # raises here when the kernel is missing for this device
        return fn
    except (RuntimeError, NotImplementedError, AttributeError):
        return None


def gemm(precision: str, be: Backend, sz: Sizes) -> Measurement | None:
    """FLOP/s of a prefill-shaped matmul [M, K] x [K, N]."""
    fn = matmul_op(precision, sz.gemm_m, sz.gemm_k, sz.gemm_n, be.device)
    if fn is None:
        return None
    return rate(2.0 * sz.gemm_m * sz.gemm_k * sz.gemm_n, time_op(fn, be.sync, sz.repeats, sz.min_time),
                "FLOP/s")


def gemv(precision: str, be: Backend, sz: Sizes) -> Measurement | None:
    """Weight bytes streamed per second by a decode matvec (M=1) over weights larger than the cache."""
    from hetero.dtypes import weight_bytes

    k = 4096
    per_row = weight_bytes(precision, (1, k))
    n = max(64, (sz.gemv_bytes // per_row) // 64 * 64)  # multiple of 64 keeps the int4 packing happy
    fn = matmul_op(precision, 1, k, n, be.device)
    if fn is None:
        return None
    return rate(float(weight_bytes(precision, (n, k))), time_op(fn, be.sync, sz.repeats, sz.min_time), "B/s")


def mem_bandwidth(be: Backend, sz: Sizes) -> tuple[Measurement, Measurement]:
    """(copy, read): a large buffer copy counting bytes read + written (STREAM Copy convention), and a
    read-only reduction over the same buffer."""
    import torch

    n = sz.copy_bytes // 4
    src = torch.rand(n, dtype=torch.float32, device=be.device)
    dst = torch.empty_like(src)
    copy = rate(2.0 * n * 4, time_op(lambda: dst.copy_(src), be.sync, sz.repeats, sz.min_time), "B/s")
    read = rate(1.0 * n * 4, time_op(lambda: src.sum(), be.sync, sz.repeats, sz.min_time), "B/s")
    return copy, read


def op_overhead(be: Backend, sz: Sizes) -> Measurement:
    """Seconds per tiny op: the fixed cost of dispatch (CPU) or kernel launch (GPU)."""
    import torch

    a = torch.ones(8, device=be.device)
    b = torch.ones(8, device=be.device)
    iters = sz.overhead_iters

    def loop() -> None:
        for _ in range(iters):
            torch.add(a, b)

    secs = time_op(loop, be.sync, sz.repeats, sz.min_time)
    return per_call([s / iters for s in secs])


def h2d(be: Backend, sz: Sizes) -> tuple[Measurement, Measurement]:
    """(pinned, pageable) host -> device copy bandwidth."""
    import torch

    n = sz.copy_bytes
    host = torch.empty(n, dtype=torch.uint8)
    pinned = be.pin(torch.empty(n, dtype=torch.uint8))
    dev = torch.empty(n, dtype=torch.uint8, device=be.device)
    p = rate(float(n), time_op(lambda: dev.copy_(pinned, non_blocking=True), be.sync, sz.repeats,
                               sz.min_time), "B/s")
    q = rate(float(n), time_op(lambda: dev.copy_(host), be.sync, sz.repeats, sz.min_time), "B/s")
    return p, q
