"""hetero.hardware: what devices a machine has (HardwareSpec) and how fast they are (Profile).

`machine(name)` is the one entry point the planner uses: this machine (inventoried and profiled),
a catalog composition for what-if plans, or a HardwareSpec saved as JSON.
"""
from __future__ import annotations

import json
from pathlib import Path

from hetero.errors import HeteroError
from hetero.hardware.types import (DeviceProfile, DeviceSpec, HardwareSpec, LinkSpec, Measurement,
                                   Profile)

__all__ = ["machine", "DeviceSpec", "LinkSpec", "HardwareSpec", "Measurement", "DeviceProfile", "Profile"]


def machine(name: str = "this") -> tuple[HardwareSpec, Profile | None]:
    """(spec, profile): "this" -> inventory + measured profile (cached); "catalog:..." -> spec sheet,
    no profile; a path to a HardwareSpec JSON file -> that spec, no profile."""
    if name in ("this", "", "local"):
        from hetero.hardware.inventory import inventory
        from hetero.hardware.profile import get_profile_isolated

        return inventory(), get_profile_isolated()
    if name.startswith("catalog:"):
        from hetero.hardware.catalog import resolve

        return resolve(name), None
    path = Path(name).expanduser()
    if path.is_file():
        try:
            return HardwareSpec.from_dict(json.loads(path.read_text())), None
        except (ValueError, KeyError, TypeError) as e:
            raise HeteroError(f"{path} is not a HardwareSpec JSON file ({type(e).__name__}: {e})") from None
    from hetero.hardware.catalog import entries

    if name.split("+")[0].lstrip("0123456789x") in entries() or "+" in name:
        from hetero.hardware.catalog import resolve

        return resolve(name), None
    raise HeteroError(f"unknown machine {name!r}: use 'this', 'catalog:PARTS' (see `hetero catalog`), "
                      "or a path to a HardwareSpec JSON file")
