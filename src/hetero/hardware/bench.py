"""Micro-benchmarks of one compute device: matmul rates (GEMM for prefill, GEMV for decode) per
precision, memory bandwidth, fixed per-op overhead, and host->device copies on CUDA.

Each figure is a Probe timed in batches; a batch repeats the op until it lasts at least `min_time`
seconds so that timer resolution and dispatch jitter do not dominate.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

from hetero.dtypes import BLOCK_PRECISIONS
from hetero.errors import HeteroError
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
    repeats: int = 3               # timed batches per round
    rounds: int = 3                # passes over all probes: each figure gets rounds x repeats samples
    min_time: float = 0.05         # seconds per timed batch
    overhead_iters: int = 2000
    rows_m: int = 32               # activation rows of the batched-decode probe (ops.native.SMALL_M)
    rows_k: int = 2048             # its weight [rows_n, rows_k]: the compute of a step's rows, which the
    rows_n: int = 2048             # roofline sets against the weight read (GEMV) separately


QUICK = Sizes()
FULL = Sizes(gemm_m=512, gemm_k=4096, gemm_n=4096, gemv_bytes=256 << 20, copy_bytes=512 << 20,
             disk_bytes=512 << 20, repeats=3, rounds=5, min_time=0.15)


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


def calibrate(fn: Callable[[], object], sync: Callable[[], None], min_time: float) -> int:
    """Calls per timed batch so that one batch lasts at least `min_time` (after one warm-up call:
    allocator, kernel selection, packing caches)."""
    fn()
    sync()
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        dt = time.perf_counter() - t0
        if dt >= min_time or n >= 1 << 20:
            return n
        n = max(n * 2, int(n * min_time / max(dt, 1e-9) * 1.1))


def time_batches(fn: Callable[[], object], sync: Callable[[], None], n: int, repeats: int) -> list[float]:
    """Seconds per call, one value per batch of `n` calls."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        out.append((time.perf_counter() - t0) / n)
    return out


def time_op(fn: Callable[[], object], sync: Callable[[], None], repeats: int, min_time: float) -> list[float]:
    return time_batches(fn, sync, calibrate(fn, sync, min_time), repeats)


def _int4_weight(n: int, k: int, device: str, group: int):
    """A packed int4 weight [N, K] and its bf16 scales+zeros [K/group, N, 2] for the device's kernel."""
    import torch

    if device == "cpu":
        # packed in row blocks: the int32 input is 8x the packed size, too big to hold at once for a
        # weight larger than the cache (the CPU layout is per row, so blocks concatenate)
        packed = torch.cat([torch._convert_weight_to_int4pack_for_cpu(
            torch.randint(0, 16, (min(2048, n - r), k), dtype=torch.int32), 1) for r in range(0, n, 2048)])
        mm = torch._weight_int4pack_mm_for_cpu
    else:
        # the CUDA kernel takes two nibbles per uint8 and an inner-k-tile count of 8
        w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device)
        packed = torch._convert_weight_to_int4pack(w, 8)
        mm = torch._weight_int4pack_mm
    sz = torch.rand(k // group, n, 2, dtype=torch.bfloat16, device=device)
    return lambda x: mm(x, packed, group, sz)


# Byte offsets of the fp16 scale fields in one block of each GGUF format (the rest may be any bits).
_BLOCK_SCALES = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(ggml_type: str, n: int, k: int, device: str = "cpu"):
    """A BlockTensor [n, k] of random quants with small, finite fp16 scales: what a probe times."""
    import torch

    from hetero.dtypes import GGML_BLOCKS
    from hetero.ops.blocks import BlockTensor

    per, size = GGML_BLOCKS[ggml_type]
    raw = torch.randint(0, 256, (n, k // per, size), dtype=torch.uint8)
    for off in _BLOCK_SCALES[ggml_type]:
        raw[:, :, off:off + 2] = torch.tensor([0.01], dtype=torch.float16).view(torch.uint8)
    return BlockTensor(ggml_type, raw.reshape(n, -1).to(device), (n, k))


def _block_op(precision: str, m: int, k: int, n: int, device: str):
    """x[m, k] @ W^T through the engine's own layer for a GGUF block format (hetero.ops.native)."""
    import torch

    from hetero.ops.linear import make_linear

    lin = make_linear(random_blocks(precision.upper(), n, k, "cpu"), None, precision, device)
    x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
    return lambda: lin(x)


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
        if precision in BLOCK_PRECISIONS:
            fn = _block_op(precision, m, k, n, device)
            fn()
            return fn
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
    except (RuntimeError, NotImplementedError, AttributeError, ImportError, HeteroError):
        return None


def rows_op(precision: str, m: int, k: int, n: int, device: str):
    """x[m, k] @ W[n, k]^T through the engine's layer for `precision` and its small-M `rows` path
    (a batched decode step's rows: ops/kernels gemm_rows), or None without such a layer here."""
    import torch

    from hetero.ops.linear import make_linear

    try:
        if precision in BLOCK_PRECISIONS:
            lin = make_linear(random_blocks(precision.upper(), n, k, "cpu"), None, precision, device)
        else:
            lin = make_linear(torch.randn(n, k) * 0.02, None, precision, device)
        f = getattr(lin, "rows", lin)
        x = torch.randn(1, m, k, dtype=torch.bfloat16, device=device)
        f(x)  # raises here when the kernel is missing for this device
        return lambda: f(x)
    except (RuntimeError, NotImplementedError, AttributeError, ImportError, HeteroError, KeyError, ValueError):
        return None


class Probe:
    """One figure: an op built lazily (`make` returns the callable, or None when unsupported) and
    timed in batches. `sample` can be called several times, interleaved with other probes, so each
    figure's samples spread over the whole profile and a burst of load elsewhere moves the median less.
    """

    def __init__(self, key: tuple[str, ...], unit: str, work: float, make: Callable[[], Callable | None],
                 sync: Callable[[], None], min_time: float, scale: float = 1.0):
        self.key, self.unit, self.work, self.scale = key, unit, work, scale  # scale: "s" per call -> per op
        self.make, self.sync, self.min_time = make, sync, min_time
        self.fn: Callable | None = None
        self.supported = True
        self.values: list[float] = []   # rates (work/s), or seconds per call when unit == "s"
        self.n = 0                      # calls per timed batch, calibrated on the first sample
        self.note = ""                  # how it was measured, when that varies (disk: O_DIRECT or not)
        self.spread = False             # cheap figure: one batch between every other probe (see measure)
        self.once = False               # sampled in the first round only (see measure): a figure that
                                        # prices extra rows, not the main rates, need not cost a profile more

    def sample(self, repeats: int) -> None:
        if not self.supported:
            return
        if self.fn is None:
            self.fn = self.make()
            if self.fn is None:
                self.supported = False
                return
        if self.n == 0:
            self.n = calibrate(self.fn, self.sync, self.min_time)
        secs = time_batches(self.fn, self.sync, self.n, repeats)
        self.values += [s * self.scale for s in secs] if self.unit == "s" else [self.work / s for s in secs if s > 0]

    def result(self) -> Measurement | None:
        if not self.values:
            return None
        v = self.values
        return Measurement(median=statistics.median(v), min=min(v), max=max(v), unit=self.unit,
                           repeats=len(v))

    def release(self) -> None:
        self.fn = None  # frees the op's tensors; a later sample would rebuild them


def _gemv_n(precision: str, k: int, nbytes: int) -> int:
    from hetero.dtypes import weight_bytes

    per_row = weight_bytes(precision, (1, k))
    return max(64, (nbytes // per_row) // 64 * 64)  # multiple of 64 keeps the int4 packing happy


EAGER_BYTES = 2 << 20  # one activation of a training step: [512 tokens, 1024] fp32


def eager_op(nbytes: int):
    """`out = a * 2` over `nbytes` of fp32 into an output whose pages are handed back to the system
    first (madvise DONTNEED), so each call faults them in afresh: as a training step's transients do,
    each a new mapping (runtime.memory.fixed_mmap_threshold), and with the op's thread fork/join.
    None where madvise is not available."""
    import ctypes
    import mmap

    import torch

    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    a = torch.rand(nbytes // 4)
    out = torch.empty(nbytes // 4 + mmap.PAGESIZE)  # a page of slack: the inner page-aligned range is nbytes
    start = -(-out.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE
    off = (start - out.data_ptr()) // 4
    dst = out[off:off + nbytes // 4]
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)

    def op() -> None:
        madvise(start, nbytes, 4)  # MADV_DONTNEED: the next write faults in zeroed pages
        torch.mul(a, 2.0, out=dst)
    return op


def device_probes(be: Backend, sz: Sizes) -> list[Probe]:
    """Every figure of one compute device, as lazily built probes."""
    import torch

    from hetero.dtypes import NATIVE, PRECISIONS, weight_bytes

    measured = [prec for prec in PRECISIONS if prec != NATIVE]  # native is priced per unit from these

    def p(key, unit, work, make, scale=1.0):
        return Probe(key, unit, work, make, be.sync, sz.min_time, scale)

    out = []
    n = sz.copy_bytes // 4

    def bufs():
        # shared by the copy and read probes: [src, dst], built on first use
        if not _bufs:
            _bufs.append(torch.rand(n, dtype=torch.float32, device=be.device))
            _bufs.append(torch.empty_like(_bufs[0]))
        return _bufs
    _bufs: list = []
    # copy: bytes read + written (STREAM Copy convention); read: a reduction over the same buffer
    out.append(p(("mem_bandwidth",), "B/s", 2.0 * n * 4, lambda: (lambda b=bufs(): b[1].copy_(b[0]))))
    out.append(p(("mem_read_bandwidth",), "B/s", 1.0 * n * 4, lambda: (lambda b=bufs(): b[0].sum())))
    # this VM's memory bandwidth moves 25-50% for seconds at a time; a batch lasts ~0.05 s, so these
    # two are sampled between every other probe and their medians cover the whole run
    out[-2].spread = out[-1].spread = True

    def tiny_ops():
        a, b = torch.ones(8, device=be.device), torch.ones(8, device=be.device)

        def loop() -> None:
            for _ in range(sz.overhead_iters):
                torch.add(a, b)
        return loop
    # seconds per tiny op: the fixed cost of dispatch (CPU) or kernel launch (GPU)
    out.append(p(("op_overhead",), "s", 0.0, tiny_ops, scale=1.0 / sz.overhead_iters))

    if not be.is_cuda:  # bytes/s of an eager elementwise op into fresh pages: what a training step's ops run at
        out.append(p(("eager_bandwidth",), "B/s", 2.0 * EAGER_BYTES, lambda: eager_op(EAGER_BYTES)))

    gemm_work = 2.0 * sz.gemm_m * sz.gemm_k * sz.gemm_n
    for prec in measured:
        out.append(p(("gemm", prec), "FLOP/s", gemm_work,
                     lambda prec=prec: matmul_op(prec, sz.gemm_m, sz.gemm_k, sz.gemm_n, be.device)))
    k = 4096
    for prec in measured:
        nrows = _gemv_n(prec, k, sz.gemv_bytes)
        out.append(p(("gemv", prec), "B/s", float(weight_bytes(prec, (nrows, k))),
                     lambda prec=prec, nrows=nrows: matmul_op(prec, 1, k, nrows, be.device)))
    out += rows_probes(be, sz)
    if be.is_cuda:
        def h2d(pinned: bool):
            def make():
                host = torch.empty(sz.copy_bytes, dtype=torch.uint8)
                host = be.pin(host) if pinned else host
                dev = torch.empty(sz.copy_bytes, dtype=torch.uint8, device=be.device)
                return lambda: dev.copy_(host, non_blocking=pinned)
            return make
        out.append(p(("h2d_pinned",), "B/s", float(sz.copy_bytes), h2d(True)))
        out.append(p(("h2d_pageable",), "B/s", float(sz.copy_bytes), h2d(False)))
    return out


def rows_probes(be: Backend, sz: Sizes) -> list[Probe]:
    """The batched-decode figures of one device: the row kernels' FLOP/s per precision."""
    from hetero.dtypes import NATIVE, PRECISIONS

    work = 2.0 * sz.rows_m * sz.rows_k * sz.rows_n
    out = [Probe(("gemm_rows", prec), "FLOP/s", work,
                 lambda prec=prec: rows_op(prec, sz.rows_m, sz.rows_k, sz.rows_n, be.device), be.sync, sz.min_time)
           for prec in PRECISIONS if prec != NATIVE]
    for p in out:
        p.once = True
    return out
