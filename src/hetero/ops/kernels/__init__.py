"""Optional compiled decode kernels (AVX-512 matrix-vector products, fused decode ops), with a
pure-torch fallback.

`get()` returns the compiled module or None; `status()` says which, and why. The module is built
once per (sources, torch, compiler, flags) with the C++ compiler against torch's headers
(`python -m hetero.ops.kernels` builds it ahead of time; the Makefile's install runs that) and
loaded from there afterwards. The compiler's command and output go to `log_path()`. Anything
missing — not x86 with AVX-512, no compiler, a compile error, HETERO_KERNELS=0 — means None, and
callers use stock torch kernels.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

NAME = "hetero_gemv"
HERE = Path(__file__).parent
# One extension from these sources; every header is hashed too (the build key).
SOURCES = tuple(HERE / n for n in ("gemv.cpp", "gemv_blocks.cpp", "gemm_rows.cpp", "decode_ops.cpp", "decode_stack.cpp",
                                     "decode_rows.cpp", "experts.cpp", "module.cpp"))
HEADERS = tuple(HERE / n for n in ("kernels.h", "common.h", "rows.h", "blocks.h", "decode_math.h", "stack_lin.h", "tiles.h", "blocks_i8.h",
                                   "rows_math.h"))
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl",
         "-mavx512dq", "-mfma", "-mf16c"]
# How the tensors the compiled kernels read are stored (int4's nibble order and [N, K/32, 2] scales,
# int8's fp32 scales): the tensor cache keys entries by it, so torch's kernels never read them.
# Bump it when the kernels read stored tensors differently.
LAYOUT = "kernels-v1"
# Precisions whose decode GEMV runs compiled (with the fused decode ops for fp32/bf16 activations);
# precision native runs the block types its weights hold.
SERVED = ("fp32", "bf16", "int8", "int4", "q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k")
_state: dict = {}


class BuildError(Exception):
    """The extension could not be built; the message is one line, for status()."""


def cpu_supported() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq"))


def compiler() -> str:
    return os.environ.get("CXX", "g++")


def log_path() -> Path:
    """Where the last build's compiler command and output are written."""
    from hetero.paths import cache_dir

    return cache_dir() / "kernels" / "build.log"


def _build_dir() -> Path:
    import torch

    from hetero.paths import cache_dir

    h = hashlib.sha256()
    for p in (*SOURCES, *HEADERS):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    h.update(torch.__version__.encode() + " ".join(FLAGS).encode() + sys.version.encode() + compiler().encode())
    key = h.hexdigest()[:16]
    # Next to the sources when the install is writable (an editable install: built once by `make`,
    # shared by every cache dir, tests included); otherwise in the user's cache.
    if os.access(HERE, os.W_OK):
        return HERE / "build" / key
    return cache_dir() / "kernels" / key


def _write_log(text: str) -> None:
    """The build log, written to a temp name and renamed (a reader never sees half of it)."""
    path = log_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".build.", suffix=".log", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache must not turn a build into a failure; status() says no log


def build() -> Path:
    """Compile the extension (if not already built) and return the path of the shared object.
    Raises BuildError (one line; the compiler's output is in the log) when it cannot."""
    import torch

    out = _build_dir() / f"{NAME}{sysconfig.get_config_var('EXT_SUFFIX') or '.so'}"
    if out.exists():
        return out
    from torch.utils.cpp_extension import include_paths, library_paths  # setuptools: only to compile
    out.parent.mkdir(parents=True, exist_ok=True)
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    libdir = library_paths()[0]
    cmd = [compiler(), *FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
           f"-DTORCH_EXTENSION_NAME={NAME}", "-DTORCH_API_INCLUDE_EXTENSION_H",
           *[f"-I{p}" for p in include_paths()], f"-I{sysconfig.get_paths()['include']}",
           *map(str, SOURCES), f"-L{libdir}", "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python",
           f"-Wl,-rpath,{libdir}"]
    # Build to a temp name and rename: a half-written .so must never be loaded.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd += ["-o", tmp]
    try:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:  # the compiler itself is missing or not runnable
            _write_log(f"$ {' '.join(cmd)}\n{e}\n")
            raise BuildError(f"compiler {compiler()!r} not runnable ({e.strerror or e}; set CXX); see {log_path()}") from None
        _write_log(f"$ {' '.join(cmd)}\nexit {r.returncode}\n{r.stdout}{r.stderr}")
        if r.returncode != 0:
            raise BuildError(f"compile failed (exit {r.returncode}); see {log_path()}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        try:
            out.parent.rmdir()  # only when empty: a failed build leaves no directory behind
        except OSError:
            pass
    return out


def _load():
    """(module, None) or (None, why not)."""
    if os.environ.get("HETERO_KERNELS", "1") == "0":
        return None, "HETERO_KERNELS=0"
    if platform.machine().lower() not in ("x86_64", "amd64") or not cpu_supported():
        return None, "this CPU lacks AVX-512 (F, BW, VL, DQ)"
    try:
        import torch  # noqa: F401  (libtorch must be loaded before the extension)

        path = build()
    except BuildError as e:
        return None, str(e)
    except Exception as e:  # torch's headers or paths missing: stock torch kernels still work
        first = (str(e).splitlines() or [""])[0]
        return None, f"build failed: {type(e).__name__}: {first}"
    _state["path"] = path
    try:
        spec = importlib.util.spec_from_file_location(NAME, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _state["kinds"] = dict(mod.kinds())
    except Exception as e:
        return None, f"{path} failed to load: {type(e).__name__}: {e}"
    return mod, None


def get():
    """The compiled kernel module, or None when unavailable (the caller falls back to torch)."""
    if "mod" not in _state:
        _state["mod"], _state["reason"] = _load()
        mod = _state["mod"]
        # the decode activation mode: set once a process (set_enabled reloading keeps a switched one)
        if mod is not None and hasattr(mod, "set_act_int8") and not _state.get("act_set"):
            _state["act_set"] = True
            mode = os.environ.get(DECODE_ACT_ENV, "").strip().lower()
            if mode not in ("", "int8", "bf16"):
                print(f"hetero: {DECODE_ACT_ENV}={mode!r} ignored: it takes int8 or bf16", file=sys.stderr)
                mode = ""
            mod.set_act_int8(mode != "bf16" and _has_int8(mod))   # int8 unless asked for bf16
    return _state["mod"]


def _has_int8(mod) -> bool:
    return hasattr(mod, "has_act_int8") and bool(mod.has_act_int8())


# Decode activations. int8 (the default where the CPU has AVX512-VNNI, VBMI and GFNI): decode GEMVs
# over Q8_0 / Q4_0 / Q4_1 / Q4_K / Q6_K blocks round x to int8 (one scale per 32 values; per 256 for
# the K types, as llama.cpp rounds them) and run VNNI integer dot products (kernels/blocks_i8.h):
# 1.1-1.5x the bf16 loops' weight rate, at +0.3-0.5% perplexity (docs/BENCHMARKS.md).
# HETERO_DECODE_ACT=bf16 keeps x in bf16 (the prefill's numerics).
DECODE_ACT_ENV = "HETERO_DECODE_ACT"


def set_decode_act(mode: str) -> None:
    """'int8' (the default where the CPU has the loops) or 'bf16' for every decode GEMV over GGUF
    blocks in this process; 'int8' on a CPU without them runs bf16."""
    if mode not in ("int8", "bf16"):
        raise ValueError(f"decode activations: 'int8' or 'bf16', not {mode!r}")
    mod = get()
    if mod is not None and hasattr(mod, "set_act_int8"):
        mod.set_act_int8(mode == "int8")


def decode_act() -> str:
    mod = get()
    return "int8" if mod is not None and hasattr(mod, "act_int8") and mod.act_int8() and _has_int8(mod) else "bf16"


def status() -> dict:
    """Whether the compiled kernels serve this process, what they serve, and why not when they don't."""
    mod = get()
    log = log_path()
    return {"active": mod is not None,
            "gemv": list(SERVED) if mod is not None else [],
            "fused_decode": mod is not None,
            "int4_bf16_dot": bool(mod.has_bf16_dot()) if mod is not None else False,
            "decode_act": decode_act(),
            "reason": _state.get("reason"),
            "log": str(log) if log.exists() else None,
            "build": str(_state["path"]) if _state.get("path") else None}


def kinds() -> dict[str, int]:
    """The decode stack's code per linear kind (fp32, bf16, int8, int4, q8_0 .. q6_k), as the module
    defines them; empty when it was never loaded in this process."""
    return dict(_state.get("kinds", {}))


def layout(precision: str, device: str) -> str:
    """How a unit of `precision` on `device` stores what its kernels read: LAYOUT when the compiled
    kernels build it, "torch" otherwise."""
    import torch

    served = torch.device(device).type == "cpu" and precision in SERVED
    return LAYOUT if served and get() is not None else "torch"


def set_enabled(enabled: bool) -> None:
    """Switch the compiled kernels on or off for this process (tests compare both paths)."""
    _state.pop("mod", None)
    _state.pop("reason", None)
    if not enabled:
        _state["mod"], _state["reason"] = None, "switched off in this process"
