"""`python -m hetero.runtime.kernels`: build the compiled decode kernels ahead of time."""
from hetero.runtime.kernels import build, get

path = build(verbose=True)
print(f"built {path}" if get() is not None else "compiled kernels unavailable; using torch kernels")
