"""`python -m hetero.ops.kernels`: build the compiled decode kernels ahead of time; one line out.
Exit 1 when they are not available (hetero then uses torch kernels)."""
import sys

from hetero.ops.kernels import status

st = status()
if st["active"]:
    print(f"compiled kernels: {st['build']}")
else:
    print(f"warning: compiled kernels unavailable: {st['reason']}; hetero uses torch kernels")
    sys.exit(1)
