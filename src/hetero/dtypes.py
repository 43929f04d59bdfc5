"""The one table of bytes per element for every storage type and compute precision.

Every size estimate in hetero (ModelSpec, cost model, planner, engine budgets) derives from here,
so a change of quantisation layout changes all of them at once.
"""
from __future__ import annotations

import math

# GGUF block formats run as stored (hetero.ops.native): lowercase names of the GGML types. A unit at
# one of these holds its matrices in that block format (converting from any other type); `native`
# keeps each matrix's own stored type (a dense stored matrix runs in bf16).
BLOCK_PRECISIONS: tuple[str, ...] = ("q8_0", "q6_k", "q5_k", "q4_1", "q4_k", "q4_0")
NATIVE = "native"
# Block formats hetero can quantise to from float weights (the others only run as a file stores them).
QUANTISABLE_BLOCKS: tuple[str, ...] = ("q8_0", "q4_1", "q4_0")

# Compute precisions the planner and the engine know: hetero's own grids first (largest to smallest),
# then the file's formats.
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "int8", "int4", NATIVE, *BLOCK_PRECISIONS)

# Default group size of group-wise int4 (torch's CPU int4 kernel accepts 32, 64, 128, 256).
INT4_GROUP = 32

# Weight elements an int4 prefill dequantises at a time, and the bytes each takes while it does
# (the kernel widens through fp32 to bf16): the runtime's block size and the planner's transient.
DEQUANT_ELEMENTS = 1 << 20
DEQUANT_BYTES_PER_ELEMENT = 6

# GGML block layouts: type -> (elements per block, bytes per block); mirrors gguf's GGML_QUANT_SIZES
# for the types we read, so sizes do not need the gguf package at import time.
GGML_BLOCKS: dict[str, tuple[int, int]] = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "F64": (1, 8),
    "I8": (1, 1), "I16": (1, 2), "I32": (1, 4), "I64": (1, 8),
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24),
    "Q8_0": (32, 34), "Q8_1": (32, 40),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176),
    "Q6_K": (256, 210), "Q8_K": (256, 292),
}

# safetensors / torch dtype names -> bytes per element.
DENSE_BYTES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "fp32": 4, "bf16": 2, "fp16": 2,
}


def storage_bytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of `shape` occupies when stored as `dtype` (a GGML or safetensors type)."""
    n = math.prod(shape)
    if dtype in GGML_BLOCKS:
        block, size = GGML_BLOCKS[dtype]
        return (n // block) * size if n % block == 0 else math.ceil(n / block) * size
    if dtype in DENSE_BYTES:
        return n * DENSE_BYTES[dtype]
    raise ValueError(f"unknown storage type {dtype!r}")


def is_block_type(stored: str | None) -> bool:
    """True for a GGML block-quantised storage type (Q8_0, Q4_K, ...), not a dense one."""
    return stored is not None and GGML_BLOCKS.get(stored, (1, 0))[0] > 1


def native_format(stored: str | None) -> str:
    """The precision a matrix stored as `stored` runs at under `native`: its block format, or bf16
    for a dense (or unknown) type."""
    return stored.lower() if is_block_type(stored) and stored.lower() in BLOCK_PRECISIONS else "bf16"


def weight_bytes(precision: str, shape: tuple[int, ...], group: int = INT4_GROUP, stored: str | None = None) -> int:
    """Bytes of a weight of `shape` ([out, in] for 2-D) held at a compute precision.

    1-D tensors (norm weights, biases) always stay fp32: they are tiny and precision-critical.
    int8 is per output channel (one bf16 scale per row); int4 is group-wise along the input
    dimension with a bf16 scale and zero per group (the layout of torch's int4 CPU kernel).
    Block precisions hold the GGML format's own bytes; `native` those of the stored type `stored`.
    """
    n = math.prod(shape)
    if len(shape) < 2:
        return n * 4
    if precision == NATIVE:
        precision = native_format(stored)
    if precision in BLOCK_PRECISIONS:
        return storage_bytes(precision.upper(), shape)
    rows, cols = shape[0], math.prod(shape[1:])
    if precision == "fp32":
        return n * 4
    if precision in ("bf16", "fp16"):
        return n * 2
    if precision == "int8":
        return n + rows * 2
    if precision == "int4":
        groups = math.ceil(cols / group)
        return math.ceil(n / 2) + rows * groups * 4
    raise ValueError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")


# How the KV cache is stored: "auto" in the layer's activation dtype (fp32 for fp32 weights, else
# bf16), or one dtype for every layer; int8 is codes per (token, head) with one fp16 absmax scale.
KV_DTYPES: tuple[str, ...] = ("auto", "fp32", "bf16", "int8")
KV_SCALE_BYTES = 2  # the fp16 scale of one (token, head) of an int8 cache


def kv_bytes_per_element(precision: str) -> int:
    """The "auto" KV cache is held in fp32, bf16 or fp16 (quantised weights still use a bf16 cache)."""
    return 4 if precision == "fp32" else 2


def check_kv_dtype(kv_dtype: str) -> str:
    if kv_dtype not in KV_DTYPES:
        from hetero.errors import HeteroError

        raise HeteroError(f"unknown KV dtype {kv_dtype!r}; known: {', '.join(KV_DTYPES)}")
    return kv_dtype


def kv_head_bytes(head_dim: int, precision: str, kv_dtype: str = "auto") -> int:
    """Bytes of one token's K (or V) for one kv head, in a layer at `precision`."""
    check_kv_dtype(kv_dtype)
    if kv_dtype == "int8":
        return head_dim + KV_SCALE_BYTES
    if kv_dtype == "auto":
        return head_dim * kv_bytes_per_element(precision)
    return head_dim * (4 if kv_dtype == "fp32" else 2)
