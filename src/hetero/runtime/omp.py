"""The OpenMP thread pools of this process (the OpenMP runtime torch and the compiled kernels use).

libgomp gives every thread that starts a parallel region a pool of its own workers, and once it
manages more threads than the machine has CPUs it cuts every team's spin-wait to ~100 spins, so each
parallel region then wakes its workers through the kernel. A server loads the model on its main
thread and computes on a worker thread: two pools. On 2 cores the built-in model's batched decode
step took 15.6 ms in a worker thread while the main thread's pool lived, and 8.5 ms once it was
released (docs/BENCHMARKS.md, "Serving").

    release_pool()   # on a thread done with torch: its workers exit, the compute thread's team alone
"""
from __future__ import annotations

import ctypes
import functools

OMP_PAUSE_HARD = 2  # OpenMP 5.0: free the calling thread's threads (they are re-made if it computes again)


@functools.lru_cache(maxsize=1)
def _runtime():
    """The loaded OpenMP runtime's omp_pause_resource_all, or None (none loaded, or too old)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if ".so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        name = path.rsplit("/", 1)[-1]
        if name.startswith(("libgomp", "libomp", "libiomp5")):
            try:
                fn = ctypes.CDLL(path).omp_pause_resource_all
            except (OSError, AttributeError):
                continue
            fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
            return fn
    return None


def release_pool() -> bool:
    """Free the calling thread's OpenMP workers (a thread that will compute no more); True if the
    runtime did. Call it outside any parallel region; other threads' pools are not touched."""
    fn = _runtime()
    return fn is not None and fn(OMP_PAUSE_HARD) == 0
