"""Prefill GEMMs of one TinyLlama-1.1B layer three ways: bf16 (dense), today's int8 weight-only
(torch._weight_int8pack_mm, bf16 activations) and W8A8 (activations quantised per token, then
torch._int_mm and a rescale: hetero.ops.actquant.int8_mm). Best of R per shape, in-process.

    OMP_NUM_THREADS=2 python benchmarks/w8a8_prefill.py [--tokens 256] [--repeats 5]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from hetero.ops.actquant import int8_mm
from hetero.ops.linear import quantize_int8_per_channel

# (N, K) of q/k/v fused, o, gate/up fused, down at hidden 2048, FFN 5632, 32 heads / 4 KV heads
SHAPES = [(2560, 2048), (2048, 2048), (11264, 2048), (2048, 5632)]


def best(fn, repeats: int) -> float:
    fn()
    out = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    tot = {"bf16": 0.0, "int8 weight-only": 0.0, "w8a8": 0.0}
    flops = 0.0
    for n, k in SHAPES:
        w = torch.randn(n, k, generator=g)
        x = torch.randn(a.tokens, k, generator=g).to(torch.bfloat16)
        wb = w.to(torch.bfloat16)
        q, s = quantize_int8_per_channel(w)
        sb = s.to(torch.bfloat16)
        row = {"bf16": best(lambda: F.linear(x, wb), a.repeats),
               "int8 weight-only": best(lambda: torch._weight_int8pack_mm(x, q, sb), a.repeats),
               "w8a8": best(lambda: int8_mm(x, q, s).to(torch.bfloat16), a.repeats)}
        f = 2.0 * a.tokens * n * k
        flops += f
        print(f"N={n:5d} K={k:4d}: " + ", ".join(f"{name} {f / t / 1e9:6.1f} GOP/s" for name, t in row.items()))
        for name, t in row.items():
            tot[name] += t
    print(f"layer ({a.tokens} tokens, threads {torch.get_num_threads()}): "
          + ", ".join(f"{name} {t * 1e3:.1f} ms ({flops / t / 1e9:.0f} GOP/s)" for name, t in tot.items()))


if __name__ == "__main__":
    main()
