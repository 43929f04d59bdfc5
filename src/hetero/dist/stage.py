"""Measuring one pipeline stage (the engine builds it: Engine.load(plan, model, stage=rank)): the
weight bytes it holds, its heap, and a one-pass GGUF reader for building a contiguous run of units.
"""
from __future__ import annotations

import torch

from hetero.model.spec import ModelSpec


def weight_bytes(net) -> int:
    """Bytes of every distinct weight tensor a stage (a Decoder) holds (embedding, layers, norm, head)."""
    seen: dict[int, int] = {}

    def walk(obj):
        if isinstance(obj, torch.Tensor):
            if obj.numel():
                seen[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
        elif isinstance(obj, torch.nn.Module):
            for v in vars(obj).values():
                if isinstance(v, dict):  # _parameters, _buffers, _modules
                    for w in v.values():
                        walk(w)
                else:
                    walk(v)
    for t in (net.embed, net.norm, net.head, *net.layers):
        if t is not None:
            walk(t)
    return sum(seen.values())


def stage_weights(source, spec: ModelSpec, units: tuple[str, ...]):
    """A `weights(name)` callable for one stage. GGUF: the stage's tensors are dequantised in one pass
    over the file (the plain store reopens it per tensor), each handed over once and then dropped."""
    from hetero.model.weights import WeightStore, required

    store = WeightStore(source, spec)
    if source.kind != "gguf":
        return required(store)
    from hetero.model.gguf import iter_tensors

    names = {t.name for u in units for t in spec.unit_tensors(u)}
    ready = {n: torch.from_numpy(a if a.flags.writeable else a.copy())
             for n, a in iter_tensors(source.path, spec, names=names)}

    def get(name: str, blocks: bool = False):
        if blocks:  # native formats read the stored blocks, not the pre-dequantised floats
            if (b := store(name, blocks=True)) is not None and not isinstance(b, torch.Tensor):
                ready.pop(name, None)
                return b
        t = ready.pop(name, None)
        return t if t is not None else store(name)  # a tensor asked for twice (a tied head) reads again

    return required(get)


def rss_anon() -> int:
    """Resident anonymous memory (heap: the weights we built), without file pages mapped from the model."""
    from hetero.runtime.memory import proc_status_bytes

    anon = proc_status_bytes("RssAnon")
    if anon is not None:
        return anon
    import psutil

    m = psutil.Process().memory_info()
    return m.rss - getattr(m, "shared", 0)


def trim_heap() -> None:
    """Give freed load-time buffers back to the OS so RSS shows what the stage holds (glibc only)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
