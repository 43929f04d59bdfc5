"""Byte budgets as people write them: "cpu=2GB,cuda:0=4GiB,disk=50GB", "cpu=25%" (of the bf16 size)."""
from __future__ import annotations

import re

from hetero.errors import HeteroError
from hetero.model.spec import ModelSpec

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_AMOUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([a-z%]*)\s*$", re.IGNORECASE)


def parse_bytes(text: str, spec: ModelSpec | None = None) -> int:
    """"2GB" (10^9), "4GiB" (2^30), "123" (bytes), "25%" (of the model's bf16 size)."""
    m = _AMOUNT.match(text)
    if not m:
        raise HeteroError(f"cannot read {text!r} as a size; use e.g. 2GB, 512MiB, 1e9 or 25%")
    value, unit = float(m.group(1)), m.group(2).lower()
    if not value < 1e18:  # an exabyte: past any machine, and `inf` has no int
        raise HeteroError(f"size {text!r} is too large")
    if unit == "%":
        if spec is None:
            raise HeteroError(f"{text!r}: a percentage needs a model (it is a share of the bf16 size)")
        return int(value / 100.0 * spec.total_bytes("bf16"))
    if unit not in _UNITS:
        raise HeteroError(f"unknown size unit {m.group(2)!r} in {text!r}; use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB or %")
    return int(value * _UNITS[unit])


def parse_memory(text: str | None, spec: ModelSpec | None = None) -> dict[str, int]:
    """"cpu=2GB,cuda:0=4GB,disk=50GB" -> {"cpu": 2000000000, ...}; percentages are of spec's bf16 size."""
    out: dict[str, int] = {}
    if not text:
        return out
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise HeteroError(f"memory budget {part!r} should be DEVICE=SIZE, e.g. cpu=2GB")
        dev, size = (s.strip() for s in part.split("=", 1))
        if not dev:
            raise HeteroError(f"memory budget {part!r} names no device")
        if dev in out:
            raise HeteroError(f"memory budget for {dev} given twice")
        out[dev] = parse_bytes(size, spec)
    return out


def fmt_bytes(n: float, up: bool = False) -> str:
    """Decimal units, as disks and budgets are written (GB = 10^9); `up` rounds up (for minimums)."""
    import math

    n = float(n)
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            v = math.ceil(n / scale * 100) / 100 if up else n / scale
            return f"{v:.2f} {unit}"
    return f"{int(n)} B"
