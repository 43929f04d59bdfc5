"""Checks on a ModelSpec built from untrusted headers, run before anything is sized from it.

Shape numbers come from config.json or GGUF metadata that anyone can edit; a count of 10^9 layers
or a zero head count must be one clear error, not gigabytes of allocation or a ZeroDivisionError.
The tensor table must then be exactly what the shape implies: a tensor missing, with another shape,
or with bytes that do not match its type means a corrupt or mislabelled file, never a silent run.
"""
from __future__ import annotations

import math
import re

from hetero.dtypes import storage_bytes
from hetero.errors import HeteroError

# Generous bounds: the largest public decoders are well inside them, a corrupt header is not.
LIMITS: dict[str, tuple[int, int]] = {
    "n_layers": (1, 1024),
    "hidden_size": (1, 1 << 17),
    "intermediate_size": (1, 1 << 19),
    "n_heads": (1, 1024),
    "n_kv_heads": (1, 1024),
    "head_dim": (1, 1024),
    "vocab_size": (1, 1 << 22),
    "max_context": (1, 1 << 24),
    "n_experts": (1, 1 << 12),
    "experts_per_token": (1, 1 << 12),
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def check_int(value, field: str, where: str) -> int:
    """`value` as an int inside LIMITS[field] (bools and floats with a fraction are refused)."""
    lo, hi = LIMITS[field]
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or (isinstance(value, float) and (not math.isfinite(value) or value != int(value)))):
        raise HeteroError(f"{where}: {field} must be an integer (got {value!r})")
    v = int(value)
    if not lo <= v <= hi:
        raise HeteroError(f"{where}: {field} = {v} is out of range [{lo}, {hi}]")
    return v


def check_float(value, field: str, where: str, lo: float = 0.0, hi: float = 1e12) -> float:
    """A finite number in (lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise HeteroError(f"{where}: {field} must be a number (got {value!r})")
    v = float(value)
    if not math.isfinite(v) or not lo < v <= hi:
        raise HeteroError(f"{where}: {field} = {value!r} is out of range ({lo:g}, {hi:g}]")
    return v


# RMSNorm epsilon is a small guard (1e-5, 1e-6 in practice); RoPE theta is 1e4 .. 1e7 in practice.
NORM_EPS_MAX = 0.1
ROPE_THETA_RANGE = (1.0, 1e10)


def check_shape(spec, where: str) -> None:
    """The shape fields of `spec` are in range and consistent with each other."""
    for f in LIMITS:
        if f in ("n_experts", "experts_per_token") and not spec.n_experts:
            continue  # a dense model
        check_int(getattr(spec, f), f, where)
    if spec.n_experts and spec.experts_per_token > spec.n_experts:
        raise HeteroError(f"{where}: {spec.experts_per_token} experts per token exceeds the {spec.n_experts} experts")
    if spec.n_heads % spec.n_kv_heads:
        raise HeteroError(f"{where}: n_heads {spec.n_heads} is not a multiple of n_kv_heads {spec.n_kv_heads}")
    if spec.head_dim % 2:
        raise HeteroError(f"{where}: head_dim {spec.head_dim} must be even (RoPE rotates pairs)")
    check_float(spec.rope_theta, "rope_theta", where, *ROPE_THETA_RANGE)
    check_float(spec.norm_eps, "norm_eps", where, 0.0, NORM_EPS_MAX)
    if spec.layer_types:
        from hetero.model.spec import FULL, SLIDING

        if len(spec.layer_types) != spec.n_layers or any(t not in (SLIDING, FULL) for t in spec.layer_types):
            raise HeteroError(f"{where}: layer_types must name {spec.n_layers} layers, each "
                              f"{SLIDING!r} or {FULL!r} (got {list(spec.layer_types)[:8]!r}...)")
        if SLIDING in spec.layer_types:
            check_int(spec.sliding_window, "max_context", f"{where}: sliding_window")


def check_tensors(spec, where: str) -> None:
    """Every tensor the shape implies is present with that shape, and its bytes match its type."""
    from hetero.model.spec import expected_tensors

    have = {t.name: t for t in spec.tensors}
    for name, shape in expected_tensors(spec):
        t = have.get(name)
        if t is None:
            raise HeteroError(f"{where}: tensor {name} is missing")
        if tuple(t.shape) != tuple(shape):
            raise HeteroError(f"{where}: tensor {name} has shape {list(t.shape)}, the config implies {list(shape)}")
        try:
            need = storage_bytes(t.dtype, tuple(t.shape))
        except ValueError:
            if spec.format == "gguf":  # a GGML type our table lacks: gguf_index sized it from its own table
                continue
            raise HeteroError(f"{where}: tensor {name} has unknown type {t.dtype!r}") from None
        if t.nbytes != need:
            raise HeteroError(f"{where}: tensor {name} holds {t.nbytes} bytes, {t.dtype} {list(t.shape)} needs {need}")
    for t in spec.tensors:
        m = _LAYER.match(t.name)
        if m and int(m.group(1)) >= spec.n_layers:
            raise HeteroError(f"{where}: tensor {t.name} is beyond the {spec.n_layers} layers the header declares")


def check_spec(spec, where: str) -> None:
    check_shape(spec, where)
    check_tensors(spec, where)
