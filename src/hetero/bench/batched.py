"""Aggregate decode throughput with B sequences in one forward (runtime/batch.BatchRunner).

B prompts of P seeded random ids are admitted together and prefilled (timed apart); then N decode
steps of all B run, each one forward of B rows. The figure is B tokens per median step: a step
preempted by another process does not move it. B = 1 is also timed through the single-sequence
path (runtime.generate: fused and compiled decode) for comparison.
"""
from __future__ import annotations

import statistics
import time

import torch

from hetero.bench.measure import prompt_ids
from hetero.errors import HeteroError


def measure_batch(net, batch: int, prompt_tokens: int, new_tokens: int, repeats: int = 1, seed: int = 0) -> dict:
    """{"batch", "prefill_s", "decode_tok_s" (aggregate), "per_seq_tok_s", "kv_blocks", "kv_bytes"}."""
    from hetero.runtime.batch import BatchRunner
    from hetero.runtime.kvcache import KVPool

    if batch < 1:
        raise HeteroError(f"--batch takes sizes of at least 1, got {batch}")
    P, N = int(prompt_tokens), int(new_tokens)
    prompts = [prompt_ids(net.spec.vocab_size, P, seed + i)[0].tolist() for i in range(batch)]
    pool = KVPool(net, n_blocks=batch * -(-(P + N + 1) // 16), block=16)
    steps, prefill = [], []
    for r in range(repeats + 1):                      # the first pass warms up
        runner = BatchRunner(net, pool=pool, max_batch=batch, prefill_tokens=max(P, 512))
        for p in prompts:
            runner.add(p, N + 1)
        t0 = time.perf_counter()
        while any(s.prefilled < len(s.prompt) for s in runner.running) or runner.queue:
            runner.step()
        pre = time.perf_counter() - t0
        times = []
        while not runner.idle:
            t = time.perf_counter()
            runner.step()
            times.append(time.perf_counter() - t)
        if r:
            prefill.append(pre)
            steps.append(statistics.median(times))
    step = statistics.median(steps)
    return {"batch": batch, "prefill_s": round(statistics.median(prefill), 4),
            "decode_tok_s": round(batch / step, 2), "per_seq_tok_s": round(1 / step, 2),
            "kv_blocks": pool.n_blocks, "kv_bytes": pool.nbytes()}


def measure_single(net, prompt_tokens: int, new_tokens: int, repeats: int = 1, seed: int = 0) -> dict:
    """The single-sequence path's decode rate (median step), as measure_batch reports it."""
    from hetero.runtime.generate import generate_step
    from hetero.runtime.sampling import Sampler, SamplingParams

    ids = prompt_ids(net.spec.vocab_size, int(prompt_tokens), seed)[0].tolist()
    rates = []
    for r in range(repeats + 1):
        stamps = [t for _, t in generate_step(net, ids, int(new_tokens) + 1, Sampler(SamplingParams()), set())]
        if r:
            rates.append(1 / statistics.median([b - a for a, b in zip(stamps, stamps[1:])]))
    rate = statistics.median(rates)
    return {"batch": 1, "path": "single", "decode_tok_s": round(rate, 2), "per_seq_tok_s": round(rate, 2)}


def predict_batches(plan, model: str, batches: list[int], hardware: str | None = None) -> dict[int, float]:
    """The cost model's aggregate decode tok/s for `plan`'s placement at each batch size (a step of
    B rows in the batch runner: weights once, compute and KV per row; plan.rescore)."""
    import dataclasses

    from hetero.hardware import machine
    from hetero.model.sources import resolve_spec
    from hetero.plan import rescore

    spec = resolve_spec(model)
    hw, prof = machine(hardware or "this")
    return {b: rescore(dataclasses.replace(plan, batch=b, ragged=True), spec, hw, prof).predicted.decode_tok_s
            for b in sorted(set(batches))}


def measure_batches(net, batches: list[int], prompt_tokens: int, new_tokens: int, repeats: int = 1) -> list[dict]:
    with torch.inference_mode():
        rows = [measure_single(net, prompt_tokens, new_tokens, repeats)] if 1 in batches else []
        return rows + [{"path": "batched", **measure_batch(net, b, prompt_tokens, new_tokens, repeats)}
                       for b in batches]
