"""Prometheus text exposition (format 0.0.4), written by hand: a few counters, gauges and histograms
are all the server needs, and the format is plain text."""
from __future__ import annotations

import bisect
import threading
from typing import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v)}"'.replace("\n", " ") for k, v in sorted(labels.items()))
    return "{" + inner + "}"


def _num(v: float) -> str:
    """Exact for whole numbers (byte counts past 1e6 would lose digits as %g), shortest repr otherwise."""
    v = float(v)
    return str(int(v)) if v.is_integer() else repr(v)


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)   # last one is +Inf
        self.sum = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.n += 1

    def lines(self, name: str, labels: dict[str, str]) -> list[str]:
        out, cum = [], 0
        for b, c in zip(list(self.buckets) + ["+Inf"], self.counts):
            cum += c
            le = b if isinstance(b, str) else f"{b:g}"
            out.append(f"{name}_bucket{_labels({**labels, 'le': le})} {cum}")
        out.append(f"{name}_sum{_labels(labels)} {self.sum:.6f}")
        out.append(f"{name}_count{_labels(labels)} {self.n}")
        return out


class Metrics:
    """Thread-safe registry: the worker thread records tokens, the event loop records requests."""

    HELP = {
        "hetero_requests_total": ("counter", "HTTP requests answered, by route and status code."),
        "hetero_generations_total": ("counter", "Generations by outcome (ok, cancelled, error)."),
        "hetero_prompt_tokens_total": ("counter", "Prompt tokens of finished or cancelled generations."),
        "hetero_generated_tokens_total": ("counter", "Tokens generated."),
        "hetero_request_duration_seconds": ("histogram", "HTTP request latency, by route."),
        "hetero_queue_wait_seconds": ("histogram", "Time from admission to the generation's start."),
        "hetero_time_to_first_token_seconds": ("histogram", "Time from admission to the first token."),
        "hetero_inter_token_latency_seconds": ("histogram", "Time between consecutive tokens of one generation."),
        "hetero_generations_running": ("gauge", "Generations running now (in the batch, or interleaved)."),
        "hetero_generations_waiting": ("gauge", "Requests queued for a place (and, batching, KV blocks): the queue length."),
        "hetero_process_resident_bytes": ("gauge", "Resident memory of the server process."),
        "hetero_process_peak_resident_bytes": ("gauge", "Peak resident memory of the server process."),
        "hetero_model_weight_bytes": ("gauge", "Bytes of model weights at their run precision, by device."),
        "hetero_model_context_tokens": ("gauge", "The context a request may use (the plan's)."),
        "hetero_budget_bytes": ("gauge", "The plan's memory budget, by device."),
        "hetero_footprint_peak_bytes": ("gauge", "Measured peak footprint since start, by device."),
        "hetero_over_budget": ("gauge", "1 where the measured peak is over the device's budget."),
        "hetero_expert_cache_hit_ratio": ("gauge", "Routed experts found in the expert cache / experts looked up."),
        "hetero_expert_cache_lookups": ("gauge", "Expert-cache lookups since start, by result (hit, miss)."),
        "hetero_expert_cache_read_bytes": ("gauge", "Bytes of routed experts read from disk since start."),
        "hetero_batch_size": ("gauge", "Sequences decoded in the latest batched step."),
        "hetero_batch_prefill_tokens": ("gauge", "Prompt tokens prefilled in the latest batched step."),
        "hetero_kv_blocks_used": ("gauge", "KV pool blocks held by running sequences."),
        "hetero_kv_blocks_total": ("gauge", "KV pool blocks in all."),
        "hetero_kv_blocks_cached": ("gauge", "KV pool blocks the prefix cache holds (shared, or idle and free to evict)."),
        "hetero_prefix_cached_tokens": ("gauge", "Prompt tokens since start taken from the prefix cache instead of prefilled."),
        "hetero_kv_block_tokens": ("gauge", "Tokens one KV pool block holds."),
        "hetero_kv_resident_bytes": ("gauge", "Bytes of the KV pool in memory (pages written so far; the rest is only reserved)."),
        "hetero_batch_steps_total": ("counter", "Batched forward steps run."),
        "hetero_batch_decode_rows_total": ("counter", "Decode rows over all batched steps (/ steps: mean batch)."),
        "hetero_batch_prefill_tokens_total": ("counter", "Prompt tokens prefilled in batched steps."),
        "hetero_batch_step_seconds": ("histogram", "Time of one batched step (forward and sampling)."),
    }

    def __init__(self):
        self.lock = threading.Lock()
        self.counters: dict[tuple[str, tuple], float] = {}
        self.hists: dict[tuple[str, tuple], Histogram] = {}
        self.gauges: dict[str, Callable[[], dict[tuple, float]]] = {}

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self.lock:
            self.counters[key] = self.counters.get(key, 0.0) + value

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self.lock:
            self.hists.setdefault(key, Histogram()).observe(value)

    def gauge(self, name: str, fn: Callable[[], dict[tuple, float]]) -> None:
        """`fn` returns {label tuple: value}, read at scrape time."""
        self.gauges[name] = fn

    def counter_value(self, name: str, **labels: str) -> float:
        with self.lock:
            return self.counters.get((name, tuple(sorted(labels.items()))), 0.0)

    def render(self) -> str:
        with self.lock:
            counters = dict(self.counters)
            hists = {k: (h.buckets, list(h.counts), h.sum, h.n) for k, h in self.hists.items()}
        gauges = {name: fn() for name, fn in self.gauges.items()}
        lines: list[str] = []
        for name, (kind, help_) in self.HELP.items():
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
            if kind == "counter":
                for (n, labels), v in sorted(counters.items()):
                    if n == name:
                        lines.append(f"{name}{_labels(dict(labels))} {_num(v)}")
            elif kind == "histogram":
                for (n, labels), (buckets, counts, s, cnt) in sorted(hists.items()):
                    if n == name:
                        h = Histogram(buckets)
                        h.counts, h.sum, h.n = counts, s, cnt
                        lines += h.lines(name, dict(labels))
            else:
                for labels, v in sorted(gauges.get(name, {}).items()):
                    lines.append(f"{name}{_labels(dict(labels))} {_num(v)}")
        return "\n".join(lines) + "\n"
