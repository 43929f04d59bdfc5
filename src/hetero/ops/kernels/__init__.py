"""Optional compiled decode kernels (AVX-512 matrix-vector products), with a pure-torch fallback.

`get()` returns the compiled module or None. It is built once per (source, torch, compiler flags)
with g++ against torch's headers (`python -m hetero.ops.kernels` builds it ahead of time; the
Makefile's install runs that) and loaded from there afterwards. Anything missing — not x86
with AVX-512, no compiler, HETERO_KERNELS=0 — means None, and callers use stock torch kernels.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

NAME = "hetero_gemv"
SOURCE = Path(__file__).with_name("gemv.cpp")
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl",
         "-mavx512dq", "-mfma"]
_state: dict = {}


def cpu_supported() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq"))


def _build_dir() -> Path:
    import torch

    from hetero.paths import cache_dir

    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + " ".join(FLAGS).encode()
                         + sys.version.encode()).hexdigest()[:16]
    # Next to the source when the install is writable (an editable install: built once by `make`,
    # shared by every cache dir, tests included); otherwise in the user's cache.
    here = SOURCE.parent / "build"
    if os.access(SOURCE.parent, os.W_OK):
        return here / key
    return cache_dir() / "kernels" / key


def build(verbose: bool = False) -> Path:
    """Compile the extension (if not already built) and return the path of the shared object."""
    import torch

    out = _build_dir() / f"{NAME}{sysconfig.get_config_var('EXT_SUFFIX') or '.so'}"
    if out.exists():
        return out
    from torch.utils.cpp_extension import include_paths, library_paths  # setuptools: only to compile
    out.parent.mkdir(parents=True, exist_ok=True)
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    libdir = library_paths()[0]
    cmd = [os.environ.get("CXX", "g++"), *FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
           f"-DTORCH_EXTENSION_NAME={NAME}", "-DTORCH_API_INCLUDE_EXTENSION_H",
           *[f"-I{p}" for p in include_paths()], f"-I{sysconfig.get_paths()['include']}",
           str(SOURCE), f"-L{libdir}", "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python",
           f"-Wl,-rpath,{libdir}"]
    # Build to a temp name and rename: a half-written .so must never be loaded.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run([*cmd, "-o", tmp], check=True, capture_output=not verbose)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def get():
    """The compiled kernel module, or None when unavailable (the caller falls back to torch)."""
    if "mod" in _state:
        return _state["mod"]
    mod = None
    if os.environ.get("HETERO_KERNELS", "1") != "0" and cpu_supported():
        try:
            import torch  # noqa: F401  (libtorch must be loaded before the extension)

            path = build()
            spec = importlib.util.spec_from_file_location(NAME, path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        except Exception:  # no compiler, bad headers: stock torch kernels still work
            mod = None
    _state["mod"] = mod
    return mod


def set_enabled(enabled: bool) -> None:
    """Switch the compiled kernels on or off for this process (tests compare both paths)."""
    _state.pop("mod", None)
    if not enabled:
        _state["mod"] = None

