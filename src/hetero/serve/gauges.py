"""The gauges /metrics shows besides request counts: scheduler load, process memory, the served
model's weights per device, the plan's budgets against the measured footprint and, when batching,
the latest step's batch and the KV pool's blocks."""
from __future__ import annotations

from typing import Any

from hetero.runtime.memory import peak_rss_bytes
from hetero.serve.budget import BudgetWatch
from hetero.serve.metrics import Metrics
from hetero.serve.scheduler import Scheduler


def register_gauges(metrics: Metrics, scheduler: Scheduler, engine: Any, watch: BudgetWatch) -> None:
    import psutil

    proc = psutil.Process()
    weights: dict[tuple, float] = {}
    for u in engine.plan.units:
        key = (("device", u.device),)
        weights[key] = weights.get(key, 0.0) + u.bytes
    budgets = {(("device", d),): float(b) for d, b in engine.plan.budgets.items()}
    metrics.gauge("hetero_generations_running", lambda: {(): scheduler.counts()[0]})
    metrics.gauge("hetero_generations_waiting", lambda: {(): scheduler.counts()[1]})
    metrics.gauge("hetero_process_resident_bytes", lambda: {(): proc.memory_info().rss})
    metrics.gauge("hetero_process_peak_resident_bytes", lambda: {(): peak_rss_bytes()})
    metrics.gauge("hetero_model_weight_bytes", lambda: dict(weights))
    metrics.gauge("hetero_model_context_tokens", lambda: {(): engine.plan.context})
    metrics.gauge("hetero_budget_bytes", lambda: dict(budgets))
    metrics.gauge("hetero_footprint_peak_bytes",
                  lambda: {(("device", d),): float(v) for d, v in engine.footprint().items()})
    metrics.gauge("hetero_over_budget",
                  lambda: {(("device", d),): float(d in watch.over) for d in engine.plan.budgets})
    caches = [pf for pf in getattr(engine, "prefetchers", []) if hasattr(pf, "hit_rate")]
    if caches:  # streamed routed experts (runtime/experts.py), every tier together
        def lookups() -> dict[tuple, float]:
            return {(("result", "hit"),): float(sum(c.hits for c in caches)),
                    (("result", "miss"),): float(sum(c.misses for c in caches))}

        def ratio() -> dict[tuple, float]:
            n = lookups()
            total = sum(n.values())
            return {(): n[(("result", "hit"),)] / total if total else 0.0}

        metrics.gauge("hetero_expert_cache_hit_ratio", ratio)
        metrics.gauge("hetero_expert_cache_lookups", lookups)
        metrics.gauge("hetero_expert_cache_read_bytes", lambda: {(): float(sum(c.read_bytes for c in caches))})
    runner = getattr(scheduler, "runner", None)
    if runner is not None:  # continuous batching: what the latest step ran, and the KV pool
        metrics.gauge("hetero_batch_size", lambda: {(): runner.last_decode_rows})
        metrics.gauge("hetero_batch_prefill_tokens", lambda: {(): runner.last_prefill_tokens})
        metrics.gauge("hetero_kv_blocks_used", lambda: {(): runner.pool.used_blocks})
        metrics.gauge("hetero_kv_blocks_total", lambda: {(): runner.pool.n_blocks})
        metrics.gauge("hetero_kv_blocks_cached", lambda: {(): runner.pool.cached_blocks})
        metrics.gauge("hetero_prefix_cached_tokens", lambda: {(): runner.cached_tokens})
        metrics.gauge("hetero_kv_block_tokens", lambda: {(): runner.pool.block})
        # the pool's pages in memory: its budget is only reserved address space until tokens are written
        metrics.gauge("hetero_kv_resident_bytes", lambda: {(): runner.pool.resident_bytes()})
