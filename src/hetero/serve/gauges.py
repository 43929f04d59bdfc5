"""The gauges /metrics shows besides request counts: scheduler load, process memory, the served
model's weights per device, and the plan's budgets against the measured footprint."""
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
    if caches:  # routed experts streamed from disk (runtime/experts.py)
        metrics.gauge("hetero_expert_cache_hit_ratio", lambda: {(): caches[0].hit_rate})
        metrics.gauge("hetero_expert_cache_lookups",
                      lambda: {(("result", "hit"),): float(caches[0].hits), (("result", "miss"),): float(caches[0].misses)})
        metrics.gauge("hetero_expert_cache_read_bytes", lambda: {(): float(caches[0].read_bytes)})
