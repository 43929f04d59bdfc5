"""The tensor cache: every unit's tensors, already converted to the planned precision, ready to stream.

Conversion (dequantising GGUF, quantising to int8/int4, packing for the kernel) happens once, here,
never per token. An entry holds one unit (embed, layers.i, head) at one precision for one device
kind; its file is

    [magic 8 B][header length 8 B][header JSON][pad to 4096] [tensor 0][pad] [tensor 1][pad] ...

with every tensor 4096-aligned so the data region can be read with O_DIRECT straight into an
aligned buffer and viewed as tensors without a copy. The header records the module tree of the
unit (classes and plain attributes) so a streamed unit is rebuilt without touching its weights.

Entries are keyed by the model's fingerprint, the unit, the precision, the device kind, this format,
torch's version (torch's int4 packing is its own) and the layout (the compiled kernels' packing or
torch's): a stale entry is never used. Each is written to a temp path, fsynced and renamed, so a
full disk or a crash never leaves a half-written entry.
"""
from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import shutil
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from hetero.errors import HeteroError
from hetero.model.spec import ModelSpec
from hetero.paths import cache_dir, pid_alive

FORMAT = 1
MAGIC = b"HETTC001"
ALIGN = 4096
DTYPES = {str(dt).removeprefix("torch."): dt for dt in
          (torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.uint8, torch.int32, torch.int64)}
_MODULE_KEYS = set(vars(torch.nn.Module()))  # nn.Module's own bookkeeping, never snapshotted


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def device_kind(device: str) -> str:
    return torch.device(device).type


class Holder(torch.nn.Module):
    """A bare tensor as a unit (the embedding table)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight


# ---- snapshot / restore of a unit's module tree ------------------------------------------------

def _encode(v, where: str):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).removeprefix("torch.")}
    if isinstance(v, torch.device):
        return {"device": str(v)}
    if isinstance(v, ModelSpec):
        return {"spec": True}
    if isinstance(v, (tuple, list)):
        return {"tuple": [_encode(x, where) for x in v]}
    # kernels bound at build time (a compiled extension or one of its functions): stored by name and
    # looked up again on load, so an entry never pins a kernel this process may not have
    if isinstance(v, types.ModuleType):
        return {"pymodule": v.__name__}
    if callable(v) and getattr(v, "__name__", None):
        owner = getattr(v, "__module__", None) or getattr(getattr(v, "__self__", None), "__name__", None)
        if owner:
            return {"callable": [owner, v.__name__]}
    raise TypeError(f"cannot cache attribute {where} of type {type(v).__name__}")


def _decode(v, spec: ModelSpec):
    if isinstance(v, dict):
        if "dtype" in v:
            return DTYPES[v["dtype"]]
        if "device" in v:
            return torch.device(v["device"])
        if "spec" in v:
            return spec
        if "tuple" in v:
            return tuple(_decode(x, spec) for x in v["tuple"])
        if "pymodule" in v:
            return _pymodule(v["pymodule"])
        if "callable" in v:
            owner = _pymodule(v["callable"][0])
            return None if owner is None else getattr(owner, v["callable"][1], None)
    return v


def _pymodule(name: str):
    """A module by name; hetero's optional compiled kernels through their loader (None when absent)."""
    from hetero.ops import kernels

    if name == getattr(kernels, "NAME", None):
        return kernels.get()
    if not (name.startswith("hetero") or name.startswith("torch")):
        raise HeteroError(f"tensor cache names a foreign module {name!r}")
    return importlib.import_module(name)


def snapshot(module: torch.nn.Module) -> tuple[list[dict], list[tuple[str, str, torch.Tensor]]]:
    """(module records, [(module path, attribute, tensor)]) for every module in the tree."""
    mods, tensors = [], []
    for path, m in module.named_modules():
        cls = type(m)
        if not cls.__module__.startswith("hetero."):
            raise TypeError(f"cannot cache module {path or '<unit>'} of class {cls.__qualname__}")
        attrs = {}
        for k, v in vars(m).items():
            if k in _MODULE_KEYS:
                continue
            if isinstance(v, torch.Tensor):
                tensors.append((path, k, v))
            else:
                attrs[k] = _encode(v, f"{path}.{k}")
        mods.append({"path": path, "class": f"{cls.__module__}:{cls.__qualname__}", "attrs": attrs})
    return mods, tensors


def restore(mods: list[dict], spec: ModelSpec) -> dict[str, torch.nn.Module]:
    """Rebuild the module tree without running constructors (no weights are touched); path -> module."""
    out: dict[str, torch.nn.Module] = {}
    for rec in mods:
        modname, qual = rec["class"].split(":")
        if not modname.startswith("hetero."):
            raise HeteroError(f"tensor cache names a foreign class {rec['class']!r}")
        cls = getattr(importlib.import_module(modname), qual)
        m = cls.__new__(cls)
        torch.nn.Module.__init__(m)
        for k, v in rec["attrs"].items():
            object.__setattr__(m, k, _decode(v, spec))
        path = rec["path"]
        if path:
            parent, _, name = path.rpartition(".")
            out[parent].add_module(name, m)
        out[path] = m
    return out


# ---- entries -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorSlot:
    module: str      # path in the unit's tree ("" = the unit itself)
    attr: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int      # from the start of the data region, 4096-aligned
    nbytes: int


@dataclass(frozen=True)
class Entry:
    """One cached unit on disk: where its data region is and how to view it as tensors."""
    path: Path
    unit: str
    precision: str
    device: str
    data_offset: int
    data_bytes: int       # padded to ALIGN
    modules: tuple[dict, ...]
    slots: tuple[TensorSlot, ...]

    def template(self, spec: ModelSpec, device: str | None = None) -> tuple[torch.nn.Module, dict[str, torch.nn.Module]]:
        """The unit's module tree with empty tensors, ready to be bound to a buffer."""
        tree = restore(list(self.modules), spec)
        dev = device or self.device
        for s in self.slots:
            object.__setattr__(tree[s.module], s.attr, torch.empty(0, dtype=s.dtype, device=dev))
        return tree[""], tree


def code_version() -> str:
    """A hash of the code that builds units: an entry made by other code (new attributes, another
    quantisation) is stale."""
    if "code" not in _CODE:
        import hetero.ops.blocks as blocks
        import hetero.ops.embedding as embedding
        import hetero.ops.experts as experts
        import hetero.ops.linear as linear
        import hetero.ops.native as native
        from hetero.model.arch import MODULES

        h = hashlib.sha256()
        # every architecture file (model/llama.py, model/gemma3.py, ...) and the kernels they build on
        for m in [*(importlib.import_module(n) for n in sorted(set(MODULES.values()))), linear, embedding,
                  native, blocks, experts]:
            h.update(Path(m.__file__).read_bytes())
        _CODE["code"] = h.hexdigest()[:16]
    return _CODE["code"]


_CODE: dict[str, str] = {}


def entry_key(spec: ModelSpec, unit: str, precision: str, device: str) -> dict:
    # layout: the compiled kernels' packing or torch's; an entry packed for one is unreadable by the
    # other (HETERO_KERNELS=0, or another CPU sharing the cache), so the two never share a key.
    from hetero.ops import kernels

    return {"format": FORMAT, "fingerprint": spec.fingerprint(), "unit": unit, "precision": precision,
            "device": device_kind(device), "torch": torch.__version__.split("+")[0], "code": code_version(),
            "layout": kernels.layout(precision, device)}


def entry_path(root: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return root / key["fingerprint"][:16] / f"{key['unit']}.{key['precision']}.{key['device']}.{digest}.bin"


def read_entry(path: Path, key: dict) -> Entry | None:
    """The entry at `path` if it is complete and made for `key`; None otherwise (never a stale one)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if len(head) < 16 or head[:8] != MAGIC:
                return None
            n = int.from_bytes(head[8:16], "little")
            header = json.loads(f.read(n))
            size = os.fstat(f.fileno()).st_size
    except (OSError, ValueError):
        return None
    if header.get("key") != key or size < header["data_offset"] + header["data_bytes"]:
        return None
    slots = tuple(TensorSlot(s["module"], s["attr"], DTYPES[s["dtype"]], tuple(s["shape"]), s["offset"], s["nbytes"])
                  for s in header["tensors"])
    return Entry(path, key["unit"], key["precision"], header["device"], header["data_offset"],
                 header["data_bytes"], tuple(header["modules"]), slots)


def _fail(e: OSError, what: Path) -> HeteroError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return HeteroError(f"disk full writing the tensor cache ({what}): {e.strerror}; free space or set "
                           "HETERO_CACHE to a disk with room")
    return HeteroError(f"cannot write the tensor cache at {what}: {e.strerror or e}; set HETERO_CACHE to a "
                       "writable directory")


def write_entry(path: Path, key: dict, module: torch.nn.Module, device: str) -> Entry:
    """Write one unit to `path` through a temp file and an atomic rename."""
    mods, tensors = snapshot(module)
    slots, off = [], 0
    for mpath, attr, t in tensors:
        nb = t.numel() * t.element_size()
        slots.append({"module": mpath, "attr": attr, "dtype": str(t.dtype).removeprefix("torch."),
                      "shape": list(t.shape), "offset": off, "nbytes": nb})
        off = align(off + nb)
    header = {"key": key, "device": device, "modules": mods, "tensors": slots, "data_bytes": max(off, ALIGN)}
    body = json.dumps(header).encode()
    header["data_offset"] = align(16 + len(body) + 64)
    body = json.dumps(header).encode()
    assert 16 + len(body) <= header["data_offset"]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as e:
        raise _fail(e, path.parent) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + len(body).to_bytes(8, "little") + body)
            f.write(b"\0" * (header["data_offset"] - 16 - len(body)))
            pos = 0
            for s, (_, _, t) in zip(slots, tensors):
                f.write(b"\0" * (s["offset"] - pos))
                flat = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                f.write(memoryview(flat.numpy()))
                pos = s["offset"] + s["nbytes"]
            f.write(b"\0" * (header["data_bytes"] - pos))
            f.flush()
            os.fsync(f.fileno())
            # written pages would otherwise sit in the page cache and count against the budget
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        os.replace(tmp, path)
    except OSError as e:
        _unlink(tmp)
        raise _fail(e, path) from None
    except BaseException:
        _unlink(tmp)
        raise
    entry = read_entry(path, key)
    if entry is None:  # pragma: no cover - a file we just wrote must read back
        raise HeteroError(f"tensor cache entry {path} did not read back")
    prune_siblings(path)
    return entry


STALE_AFTER_S = 600.0


def prune_siblings(path: Path, stale_after_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove this unit's entries made by other code or torch versions (same unit, precision and
    device, another key digest), so upgrades do not pile up copies of the model. Entries touched in
    the last `stale_after_s` are left alone: another process may be using them right now."""
    prefix = path.name.rsplit(".", 2)[0] + "."  # "{unit}.{precision}.{device}." (unit may hold a dot)
    now, gone = time.time(), []
    for f in path.parent.glob(prefix + "*.bin"):
        try:
            if f != path and now - f.stat().st_mtime > stale_after_s:
                f.unlink()
                gone.append(f)
        except OSError:
            pass
    return gone


def _unlink(p: Path) -> None:
    try:
        p.unlink()
    except OSError:
        pass


def clean_temps(root: Path) -> None:
    """Remove temp files left by writers that died (their pid is gone)."""
    if not root.is_dir():
        return
    for p in root.glob("*/.*.tmp"):
        try:
            pid = int(p.name.rsplit(".", 2)[-2])
        except ValueError:
            continue
        if pid == os.getpid() or not pid_alive(pid):
            _unlink(p)


# ---- building units ------------------------------------------------------------------------------

def build_unit(spec: ModelSpec, weights: Callable[[str], torch.Tensor], unit: str, precision: str,
               device: str) -> torch.nn.Module:
    """The unit's module from model.units.build_unit, the builder every path uses (cached == built,
    bit for bit); a bare embedding tensor is wrapped so that it can be snapshotted like a module."""
    from hetero.model.units import UnitConfig
    from hetero.model.units import build_unit as build

    module = build(spec, weights, unit, UnitConfig(device, precision))
    return module if isinstance(module, torch.nn.Module) else Holder(module)


def cache_root() -> Path:
    return cache_dir() / "tensors"


def missing_bytes(spec: ModelSpec, units: dict[str, tuple[str, str]], root: Path | None = None) -> int:
    """Estimated bytes of the entries still to be written for `units`."""
    root = root or cache_root()
    out = 0
    for unit, (device, precision) in units.items():
        key = entry_key(spec, unit, precision, device)
        if read_entry(entry_path(root, key), key) is None:
            out += spec.unit_bytes(unit, precision)
    return out


def ensure_entries(spec: ModelSpec, weights: Callable[[str], torch.Tensor], units: dict[str, tuple[str, str]],
                   root: Path | None = None, after_unit: Callable[[], None] | None = None,
                   progress: bool = True) -> dict[str, Entry]:
    """unit -> Entry for every (unit: (device, precision)) asked, building the missing ones.

    `after_unit` runs after each unit is built (the engine drops the source's page cache there).
    """
    root = root or cache_root()
    if root.exists() and not root.is_dir():
        raise HeteroError(f"cannot write the tensor cache at {root}: not a directory; set HETERO_CACHE to a "
                          "writable directory")
    clean_temps(root)
    out: dict[str, Entry] = {}
    missing: list[tuple[str, dict, Path]] = []
    for unit, (device, precision) in units.items():
        key = entry_key(spec, unit, precision, device)
        path = entry_path(root, key)
        e = read_entry(path, key)
        if e is None:
            missing.append((unit, key, path))
        else:
            out[unit] = e
    if not missing:
        return out
    need = sum(align(spec.unit_bytes(u, k["precision"])) + 64 * ALIGN for u, k, _ in missing)
    probe = root
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        from hetero.plan.units import fmt_bytes

        raise HeteroError(f"disk full: the tensor cache needs {fmt_bytes(need)} at {root} but only "
                          f"{fmt_bytes(free)} is free; free space or set HETERO_CACHE elsewhere")
    from hetero.progress import progress_bar

    with progress_bar(f"converting {spec.name} for the plan", total=len(missing), enabled=progress) as advance:
        for unit, key, path in missing:
            device, precision = units[unit]
            module = build_unit(spec, weights, unit, precision, device)
            out[unit] = write_entry(path, key, module, device)
            del module
            if after_unit:
                after_unit()
            advance()
    return out
