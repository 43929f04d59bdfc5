"""`python -m hetero.ops.kernels`: build the compiled decode kernels ahead of time."""
from hetero.ops.kernels import build, get

path = build(verbose=True)
print(f"built {path}" if get() is not None else "compiled kernels unavailable; using torch kernels")
