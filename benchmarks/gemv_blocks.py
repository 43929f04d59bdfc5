"""Decode GEMV weight-streaming rate of the GGUF block kernels beside the int4 rows kernel.

    PYTHONPATH=src .venv/bin/python benchmarks/gemv_blocks.py [--threads 2] [--rounds 7]

"T i8" columns: the same kernel call with int8 activations (kernels.set_act_int8: the VNNI loops
of blocks_i8.h for Q8_0, Q4_0, Q4_1, Q4_K, Q6_K).

Same matrices for every kernel ([5632, 2048] and [2048, 5632], a 1B model's MLP), bf16 and fp32
activations. Each kernel cycles over copies of its matrix totalling > 100 MB (past any L3, so every
call streams from DRAM); kernels are interleaved round by round and each keeps its best round, so a
busy machine hurts them alike. Prints GB/s of weight bytes (the file's bytes for the block types).
"""
from __future__ import annotations

import argparse
import time

import torch

from hetero.ops import kernels
from hetero.ops.blocks import SIZES, BlockTensor, QUANTIZABLE, quantize_blocks
from hetero.ops.linear import Int4Linear

SPAN = 100e6
TYPES = ("Q4_1", "Q4_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
INT8_TYPES = ("Q4_1", "Q4_0", "Q8_0", "Q4_K", "Q6_K")   # those with an int8-activation loop


def blocks_of(w: torch.Tensor, t: str) -> BlockTensor:
    if t in QUANTIZABLE:
        return quantize_blocks(w, t)
    n, k = w.shape
    block, size = SIZES[t]   # K types: random bytes (the rate does not depend on the values)
    return BlockTensor(t, torch.randint(0, 256, (n, k // block * size), dtype=torch.uint8), (n, k))


def int8_call(m, x, data, kind, k):
    m.set_act_int8(True)
    try:
        return m.gemv_gguf(x, data, kind, k)
    finally:
        m.set_act_int8(False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    m, kinds = kernels.get(), kernels.kinds()
    if m is None:
        raise SystemExit(f"compiled kernels unavailable: {kernels.status()['reason']}")
    for n, k in ((5632, 2048), (2048, 5632)):
        w = torch.randn(n, k) * 0.05
        i4 = Int4Linear(w, None)
        nb4 = i4.packed.numel() + i4.scales_zeros.numel() * 2
        c = int(SPAN // nb4) + 2
        copies = {"int4": ([(i4.packed.clone(), i4.scales_zeros.clone()) for _ in range(c)], nb4)}
        for t in TYPES:
            bt = blocks_of(w, t)
            copies[t] = ([bt.data.clone() for _ in range(int(SPAN // bt.nbytes) + 2)], bt.nbytes)
        for dt in (torch.bfloat16, torch.float32):
            x = torch.randn(k).to(dt)
            calls = {"int4": lambda i: m.gemv_int4(x, *copies["int4"][0][i % len(copies["int4"][0])])}
            for t in TYPES:
                calls[t] = (lambda i, d=copies[t][0], kd=kinds[t.lower()]: m.gemv_gguf(x, d[i % len(d)], kd, k))
            for t in INT8_TYPES if hasattr(m, "set_act_int8") else ():
                copies[f"{t} i8"] = copies[t]
                calls[f"{t} i8"] = (lambda i, d=copies[t][0], kd=kinds[t.lower()]: int8_call(m, x, d[i % len(d)], kd, k))
            best = dict.fromkeys(calls, float("inf"))
            for _ in range(a.rounds):
                for name, f in calls.items():
                    f(0)
                    t0 = time.perf_counter()
                    for i in range(24):
                        f(i)
                    best[name] = min(best[name], (time.perf_counter() - t0) / 24)
            row = ", ".join(f"{nm} {copies[nm][1] / best[nm] / 1e9:.1f}" for nm in calls)
            print(f"[{n}, {k}] x {str(dt).removeprefix('torch.')}, {a.threads} threads: {row} GB/s", flush=True)


if __name__ == "__main__":
    main()
