"""Where a MoE decode token's time goes: OLMoE-1B-7B's shape, Q4_0 file, all in RAM (issue #20).

Times each compiled call of a decode step (a layer's norm, qkv GEMV, attention, o GEMV, add+norm,
the routed experts with their routing; the final norm and the head), wall clock around each call,
over --steps decode steps after a short prompt; "python" is the step less those calls. Each part's
weight bytes over its time give its GEMV rate (GB/s). Also the experts kernel alone on this
machine's own weights, 1 and 2 threads, one layer's k experts again and again (L2/L3-warm for one
set, DRAM for random sets): the same rate in and out of cache says the kernel, not memory, sets it.
Prints one JSON line.

    PYTHONPATH=src python benchmarks/moe_profile.py [--steps 32] [--threads 2] [--precision native]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


class Timed:
    """A stand-in for the kernels module a MoE layer calls its fused decode ops on: times each call."""

    def __init__(self, inner, acc: dict, tag: str):
        self._inner, self._acc, self._tag = inner, acc, tag

    def __getattr__(self, name):
        fn = getattr(self._inner, name)

        def timed(*a, **k):
            t = time.perf_counter()
            y = fn(*a, **k)
            self._acc[f"{self._tag}{name}"] += time.perf_counter() - t
            return y

        return timed


def hook(mod, acc: dict, tag: str) -> None:
    start = {}
    mod.register_forward_pre_hook(lambda m, a: start.__setitem__("t", time.perf_counter()))
    mod.register_forward_hook(lambda m, a, y: acc.__setitem__(tag, acc[tag] + time.perf_counter() - start["t"]))


def nbytes(mod) -> int:
    seen, n = set(), 0
    for m in mod.modules():
        for t in vars(m).values():
            if isinstance(t, torch.Tensor) and t.numel() and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                n += t.numel() * t.element_size()
    return n


def profile_steps(model, steps: int) -> dict:
    from hetero.model.moe import MoELayer
    from hetero.ops.experts import ExpertBank

    net = model.net
    acc: dict = defaultdict(float)
    layers = [m for m in net.modules() if isinstance(m, MoELayer)]
    spec = model.spec
    share = spec.experts_per_token / spec.n_experts
    b = {"qkv": 0, "o": 0, "experts": 0, "head": nbytes(net.head), "router": 0}
    for layer in layers:
        hook(layer.qkv, acc, "qkv")
        hook(layer.o, acc, "o")
        layer._fused_attn = Timed(layer._fused_attn, acc, "")
        b["qkv"] += nbytes(layer.qkv)
        b["o"] += nbytes(layer.o)
        b["experts"] += int(nbytes(layer.experts) * share)
        b["router"] += layer.router.numel() * 4
    if hasattr(net.head, "logits"):   # GGUF blocks: the head's fp32 logits, not its forward
        net.head.logits = Timed(net.head, acc, "head_").logits
    else:
        hook(net.head, acc, "head")
    real = ExpertBank.routed

    def routed(self, *a):
        t = time.perf_counter()
        y = real(self, *a)
        acc["experts"] += time.perf_counter() - t
        return y

    ExpertBank.routed = routed
    try:
        from hetero.runtime.generate import generate_step
        from hetero.runtime.sampling import Sampler, SamplingParams

        ids = list(range(10, 18))
        list(generate_step(net, ids, 4, Sampler(SamplingParams()), stop_ids=set()))   # warm
        acc.clear()
        cache = net.new_cache(1, len(ids) + steps + 1)
        net(torch.tensor([ids]), 0, cache)
        acc.clear()
        tok, per = 11, []
        for s in range(steps):
            t = time.perf_counter()
            logits = net(torch.tensor([[tok]]), len(ids) + s, cache)
            tok = int(logits[0].argmax())
            per.append(time.perf_counter() - t)
    finally:
        ExpertBank.routed = real
    total = sum(per)
    acc["head"] = acc.pop("head_logits", acc.get("head", 0.0))
    parts = {k: v / steps * 1e3 for k, v in sorted(acc.items())}
    parts["python"] = total / steps * 1e3 - sum(parts.values())
    rates = {k: b[k] / (acc[k] / steps) / 1e9 for k in ("qkv", "o", "experts", "head") if acc.get(k)}
    return {"step_ms_median": statistics.median(per) * 1e3, "step_ms_mean": total / steps * 1e3,
            "ms_per_step": {k: round(v, 3) for k, v in parts.items()},
            "MB_per_step": {k: round(v / 1e6, 1) for k, v in b.items()},
            "GBps": {k: round(v, 1) for k, v in rates.items()}}


def kernel_rates(model, reps: int) -> dict:
    """experts_ffn on layer 0's own experts: one fixed set of k (cache-warm after the first call)
    vs a random set each call (from DRAM), 1 and 2 threads; min and median of reps calls."""
    from hetero.ops import kernels
    from hetero.ops.experts import ExpertBank

    bank = next(m for m in model.net.modules() if isinstance(m, ExpertBank))
    table = bank._table()
    kind = bank._kind(table)
    k, E = model.spec.experts_per_token, model.spec.n_experts
    kern = kernels.get()
    x = torch.randn(model.spec.hidden_size).to(bank.dtype)
    wt = torch.full((k,), 1.0 / k)
    per_expert = sum(t.numel() * t.element_size() for t in table[0][0][1:] + table[0][1][1:] if t is not None)
    g = torch.Generator().manual_seed(0)
    out = {}
    for th in (1, 2):
        torch.set_num_threads(th)
        for mode in ("warm", "dram"):
            ts = []
            fixed = list(range(k))
            for _ in range(reps):
                ids = fixed if mode == "warm" else sorted(torch.randperm(E, generator=g)[:k].tolist())
                ops = [table[e] for e in ids]
                t = time.perf_counter()
                kern.experts_ffn(x, kind, [o[0][1] for o in ops], [o[0][2] for o in ops], [o[1][1] for o in ops],
                                 [o[1][2] for o in ops], ids, wt)
                ts.append(time.perf_counter() - t)
            ts.sort()
            out[f"{th}t_{mode}"] = {"min_GBps": round(k * per_expert / ts[0] / 1e9, 1),
                                    "median_GBps": round(k * per_expert / ts[len(ts) // 2] / 1e9, 1)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="native")
    ap.add_argument("--kernel-reps", type=int, default=200)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import hetero
    from moe_run import gguf_path

    model = hetero.load(str(gguf_path()), dtype=a.precision, threads=a.threads)
    r = {"precision": a.precision, "threads": a.threads, "load_avg": os.getloadavg()[0]}
    r.update(profile_steps(model, a.steps))
    r["experts_kernel"] = kernel_rates(model, a.kernel_reps)
    r["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
