"""The runtime's own memory before any weights (the plan's reserve): measured in this process after
importing and warming what a run uses. Kept apart from memory.py, which only reads OS metrics.

Measuring takes seconds (imports, a forward at every CPU precision, a warm-up plan), so what the
warm-up added is kept in the cache dir, keyed by hetero's code, torch's version, the model's files
and the machine. A later process that starts the same (its RSS within TOLERANCE of the measured
one's) takes its own RSS plus that growth; any other process (a test runner, a server) measures.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

from hetero.runtime.memory import rss_bytes

TOLERANCE = 32 << 20   # two processes this close at the start grow alike (the warm-up adds ~0.3-1 GB)
FORMAT = 1


def runtime_baseline(model: str | None = None) -> int:
    """Bytes the runtime itself holds before any weights: interpreter, torch and hetero's modules,
    the allocator's first arenas, the planner's first plan, and (given `model`) that model's
    tokenizer — tens of MB for a large vocabulary, held for the whole run. Measured in this process,
    after importing and loading what a run does, or taken from a measurement of a process that
    started the same; the planner takes it off the budget (Plan.reserve)."""
    start = rss_bytes()
    path = _cache_path(model)
    grown = _cached_growth(path, start)
    if grown is not None:
        return start + grown
    end = _measure(model)
    _store(path, start, end)
    return end


def known_baseline(model: str | None = None) -> int | None:
    """A fresh process's whole size once it holds the runtime for `model` (None: never measured here),
    read without importing torch, so that a budget below it is refused before the runtime loads.
    Kept apart from the growth record above, which processes of any start size (a test runner, a
    server) rewrite."""
    path = _cache_path(model)
    try:
        return int(json.loads(path.with_suffix(".process.json").read_text())["end"]) if path else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def measure_process_size(model: str | None = None) -> int:
    """Measure known_baseline() in this process (a fresh child: nothing loaded yet) and keep it."""
    end = _measure(model)
    path = _cache_path(model)
    if path is not None:
        _store(path.with_suffix(".process.json"), 0, end)
    return end


def _measure(model: str | None) -> int:
    import torch  # noqa: F401  (the imports are the point: their pages are part of the baseline)

    import hetero.model.llama  # noqa: F401
    import hetero.model.tokenizer  # noqa: F401
    import hetero.plan.make  # noqa: F401  (scipy: a run that plans holds it)
    import hetero.runtime.engine  # noqa: F401
    import hetero.runtime.generate  # noqa: F401
    import scipy.optimize  # noqa: F401  (the planner's solver loads it on first use: a planned run holds it)

    _warm_forward()
    _warm_plan()
    if model is None:
        return rss_bytes()
    from hetero.model.sources import resolve, resolve_spec
    from hetero.model.tokenizer import load_tokenizer

    # the tokenizer as a run loads it (tokenizers, or transformers where it must): alive while measured
    tok = load_tokenizer(resolve(model), resolve_spec(model).vocab_size, None)  # noqa: F841
    return rss_bytes()


# ---- the cached measurement ----------------------------------------------------------------------

def _code_version() -> str:
    """hetero's own sources (names, sizes, mtimes): any edit is a new key."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        st = f.stat()
        h.update(f"{f.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _model_files(model: str | None) -> list[str]:
    """The files the model's tokenizer is read from, with sizes and mtimes."""
    if model is None:
        return []
    from hetero.model.sources import resolve

    src = resolve(model)
    if src.path is None or not src.path.exists():
        return [src.kind, str(src.name)]
    files = [src.path] if src.path.is_file() else sorted(p for p in src.path.iterdir() if p.is_file())
    return [src.kind] + [f"{p.resolve()}|{p.stat().st_size}|{p.stat().st_mtime_ns}" for p in files]


def _cache_path(model: str | None) -> Path | None:
    from importlib.metadata import version

    from hetero.paths import cache_dir

    try:
        key = json.dumps([FORMAT, _code_version(), version("torch"), sys.executable, sys.version, platform.node(),
                          platform.machine(), os.cpu_count(), os.sysconf("SC_PHYS_PAGES"),
                          os.environ.get("HETERO_KERNELS", ""), _model_files(model)])
    except (OSError, ValueError):
        return None  # unreadable sources or model: measure every time
    return cache_dir() / "baseline" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")


def _cached_growth(path: Path | None, start: int) -> int | None:
    """What the warm-up added in a process that started within TOLERANCE of this one, or None."""
    if path is None:
        return None
    try:
        d = json.loads(path.read_text())
        first, last = int(d["start"]), int(d["end"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if abs(start - first) > TOLERANCE or last < first:
        return None
    return last - first


def _store(path: Path | None, start: int, end: int) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".baseline-", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"start": start, "end": end}, f)
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only costs the next run the measurement


def _warm_plan() -> None:
    """One plan of a tiny model on this machine's inventory (no profile: nothing is measured). The
    first plan of a process builds the solver's state and cost tables, ~4 MB that stay; measured
    without it the reserve came out that much under the process a planned run becomes."""
    from hetero.hardware.inventory import inventory
    from hetero.model.sources import resolve_spec
    from hetero.plan.make import make_plan

    from hetero.errors import HeteroError

    try:
        make_plan(resolve_spec("synthetic:tiny"), inventory(), None, memory={"cpu": 1 << 30}, prompt_tokens=8,
                  context=16)
    except HeteroError:
        pass  # a warm-up only: a machine where even this cannot be planned fails later, with its own message


def _warm_forward() -> None:
    """One prefill and one decode step of a tiny random model at every CPU precision: the first
    forward initialises thread pools, oneDNN kernels and allocator arenas, which stay for good."""
    import torch

    from hetero.model.hf import spec_from_config
    from hetero.model.decoder import Decoder
    from hetero.model.units import UnitConfig
    from hetero.model.synthetic import config

    spec = spec_from_config(config("tiny"), source="synthetic:tiny", fmt="synthetic")
    gen = torch.Generator().manual_seed(0)
    shapes = dict(__import__("hetero.model.spec", fromlist=["expected_tensors"]).expected_tensors(spec))

    def weights(name: str) -> torch.Tensor:
        return torch.randn(shapes[name], generator=gen) * 0.1

    for prec in ("fp32", "bf16", "int8", "int4"):
        net = Decoder.build(spec, weights, default=UnitConfig("cpu", prec))
        cache = net.new_cache(1, 24)
        net(torch.arange(16).view(1, 16), 0, cache)
        net(torch.tensor([[1]]), 16, cache)
