"""CUDA devices as the runtime sees them: the memory a device needs before any weight (the plan's
reserve), and a simulated CUDA for machines without one.

`cuda_reserve` is an estimate, not a measurement: a CUDA context with torch's kernels loaded takes a
few hundred MB of the device (CUDA_CONTEXT_BYTES), cuBLAS and cuBLASLt each keep a workspace per
stream, and a weight the engine dequantises per call (ops.linear) holds one block at a time.
benchmarks/gpu_check.sh measures the context on a lent GPU; the figure here has not been checked on
a GPU yet.

`simulated_cuda()` lets the CUDA branches of the engine run on CPU tensors: while it is active,
torch.cuda reports devices, every "cuda:N" a tensor is placed on maps to the CPU (`physical`), and
streams and events are no-ops. It checks plumbing (which branch runs, what is placed where, that a
plan builds and generates), not CUDA: no kernel, copy or synchronisation of a GPU runs under it.
"""
from __future__ import annotations

import contextlib
import functools
import threading

import torch

from hetero.dtypes import DEQUANT_BYTES_PER_ELEMENT, DEQUANT_ELEMENTS

MiB = 1 << 20
# Context + loaded kernels of torch on a recent GPU: ~300-500 MB is commonly reported; the upper end.
CUDA_CONTEXT_BYTES = 512 * MiB
# cuBLAS and cuBLASLt workspaces (torch's default on Hopper is 32 MiB each, less on older GPUs).
CUBLAS_WORKSPACE_BYTES = 2 * 32 * MiB


def cuda_reserve_bytes() -> int:
    """Bytes one CUDA device needs before any weight: context, cuBLAS workspaces, one dequant block."""
    return CUDA_CONTEXT_BYTES + CUBLAS_WORKSPACE_BYTES + DEQUANT_ELEMENTS * DEQUANT_BYTES_PER_ELEMENT


def cuda_reserve(hw=None) -> dict[str, int]:
    """{cuda:N: reserve} for every CUDA device of `hw` (a HardwareSpec), or of this machine when None."""
    if hw is not None:
        names = [d.name for d in hw.compute_devices() if d.kind == "cuda"]
    else:
        names = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {n: cuda_reserve_bytes() for n in names}


def runnable(hw):
    """`hw` without the compute devices this engine cannot run (mps, xpu: the cost model prices
    them for what-if plans), so a plan made for a run never places a unit there."""
    import dataclasses

    from hetero.ops.linear import RUNNABLE_KINDS

    drop = {d.name for d in hw.compute_devices() if d.kind not in RUNNABLE_KINDS}
    if not drop:
        return hw
    return dataclasses.replace(hw, devices=tuple(d for d in hw.devices if d.name not in drop),
                               links=tuple(ln for ln in hw.links if not {ln.src, ln.dst} & drop))


# ---- simulated CUDA ------------------------------------------------------------------------------

_SIMULATED = threading.Event()


def physical(device) -> torch.device | None:
    """Where a tensor meant for `device` really goes: the CPU for cuda:N while CUDA is simulated,
    else `device` itself (None stays None)."""
    if device is None:
        return None
    d = torch.device(device) if isinstance(device, (str, int)) and not isinstance(device, bool) else device
    if _SIMULATED.is_set() and isinstance(d, torch.device) and d.type == "cuda":
        return torch.device("cpu")
    return d


def _is_device(a) -> bool:
    if isinstance(a, torch.device):
        return True
    if isinstance(a, str):
        try:
            torch.device(a)
            return True
        except RuntimeError:
            return False
    return False


class _Event:
    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


class _Stream:
    def __init__(self, device=None, **_):
        self.device = torch.device(device) if device is not None else torch.device("cuda:0")

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event=None):
        return event or _Event()


@contextlib.contextmanager
def _stream_ctx(stream=None):
    yield stream


# torch factories that take device= (the ones the engine's CUDA path uses; any other one fails loudly
# under the simulation, which is the point: a placement that bypasses these shows up)
_FACTORIES = ("empty", "zeros", "ones", "full", "rand", "randn", "randint", "arange", "tensor",
              "empty_like", "zeros_like", "ones_like", "full_like", "randn_like", "as_tensor")


@contextlib.contextmanager
def simulated_cuda(devices: int = 1):
    """Run CUDA code paths on CPU tensors (see the module docstring); restores torch on exit."""
    if _SIMULATED.is_set():
        raise RuntimeError("simulated_cuda is already active")
    saved: list[tuple[object, str, object]] = []

    def patch(owner, name, value):
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def factory(fn):
        @functools.wraps(fn)
        def wrapped(*args, **kw):
            if "device" in kw:
                kw["device"] = physical(kw["device"])
            kw.pop("pin_memory", None)  # pinned host memory needs a CUDA driver
            return fn(*args, **kw)
        return wrapped

    real_to = torch.Tensor.to

    def to(self, *args, **kw):
        args = tuple(physical(a) if _is_device(a) else a for a in args)
        if "device" in kw:
            kw["device"] = physical(kw["device"])
        return real_to(self, *args, **kw)

    real_generator = torch.Generator

    def generator(device="cpu"):
        return real_generator(device=physical(device))

    try:
        for name in _FACTORIES:
            patch(torch, name, factory(getattr(torch, name)))
        patch(torch.Tensor, "to", to)
        patch(torch.Tensor, "cuda", lambda self, *a, **k: self)
        patch(torch.Tensor, "pin_memory", lambda self, *a, **k: self)
        patch(torch, "Generator", generator)
        c = torch.cuda
        patch(c, "is_available", lambda: True)
        patch(c, "device_count", lambda: devices)
        patch(c, "current_device", lambda: 0)
        patch(c, "set_device", lambda d: None)
        patch(c, "synchronize", lambda d=None: None)
        patch(c, "Stream", _Stream)
        patch(c, "Event", lambda *a, **k: _Event())
        patch(c, "stream", _stream_ctx)
        patch(c, "current_stream", lambda d=None: _Stream(d))
        for name in ("max_memory_reserved", "max_memory_allocated", "memory_reserved", "memory_allocated"):
            patch(c, name, lambda d=None: 0)
        patch(c, "reset_peak_memory_stats", lambda d=None: None)
        _SIMULATED.set()
        yield
    finally:
        _SIMULATED.clear()
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)
