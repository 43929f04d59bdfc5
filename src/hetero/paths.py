"""Where hetero keeps its cache (synthetic weights, hardware profiles, converted plans)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """~/.cache/hetero, or $HETERO_CACHE when set."""
    root = os.environ.get("HETERO_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "hetero"
