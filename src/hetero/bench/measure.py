"""Measure one built model: time to first token, prefill and decode tok/s (median and spread over
repeats), each unit's share of a prefill and of a decode step, and the peak footprint per device.

    m = measure_engine(engine, prompt_tokens=512, new_tokens=128, context=640, repeats=3)
    compare(plan, m)        # predicted vs measured with the relative error per metric and per unit

Decode steps are timed at positions max(P, C - N) .. that + N - 1, so a run planned for context C
attends over the context the plan priced even when the prompt is short (the cache between the prompt
and those positions holds zeros: speed does not depend on what the keys are). Prompts are seeded
random token ids, for the same reason.

Per-unit times come from one extra pass with forward hooks around every decoder layer; the pass
gives the split, the un-hooked repeats give the totals (the split is scaled to sum to them), so the
hooks' own cost never shows in a headline figure. The embedding's share is everything before the
first layer starts; the head's is everything after the last layer ends (final norm, projection,
token choice), which is what the cost model charges them.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

CHUNK = 512  # prefill chunk, as hetero.runtime.generate does


@dataclass(frozen=True)
class Stat:
    """A measured figure over repeats."""
    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, xs: list[float]) -> "Stat":
        return cls(statistics.median(xs), min(xs), max(xs), len(xs))

    @property
    def spread(self) -> float:
        """(max - min) / median: the relative range the repeats covered."""
        return (self.max - self.min) / self.median if self.median else 0.0


@dataclass
class Measured:
    prompt_tokens: int
    new_tokens: int
    context: int
    ttft_s: Stat
    prefill_tok_s: Stat
    decode_tok_s: Stat
    unit_decode_ms: dict[str, float] = field(default_factory=dict)   # unit -> ms of one decode step
    unit_prefill_ms: dict[str, float] = field(default_factory=dict)  # unit -> ms of the prefill
    footprint_bytes: dict[str, int] = field(default_factory=dict)    # device -> peak bytes, whole process
    footprint_run_bytes: dict[str, int] = field(default_factory=dict)  # peak from built to done (no loading)
    decode_tok_s_mean: Stat | None = None                            # tokens / total decode time

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Measured":
        return cls(d["prompt_tokens"], d["new_tokens"], d["context"], Stat(**d["ttft_s"]),
                   Stat(**d["prefill_tok_s"]), Stat(**d["decode_tok_s"]), dict(d.get("unit_decode_ms", {})),
                   dict(d.get("unit_prefill_ms", {})), {k: int(v) for k, v in d.get("footprint_bytes", {}).items()},
                   {k: int(v) for k, v in d.get("footprint_run_bytes", {}).items()},
                   Stat(**d["decode_tok_s_mean"]) if d.get("decode_tok_s_mean") else None)


def device_sync(device) -> None:
    """Wait for the work queued on `device` (CUDA launches return before the kernel ends); nothing
    to wait for on the CPU."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(torch.device(device))


def net_devices(net) -> list[str]:
    """The devices a built model computes on (layers and head)."""
    return sorted({str(getattr(layer, "device", "cpu")) for layer in net.layers}
                  | {str(getattr(net, "head_device", "cpu"))})


def sync_all(devices: list[str]) -> None:
    """Wait for every device the model runs on: a step ends when its last kernel does (a real run
    reads the token back to the host each step, which waits the same way)."""
    for d in devices:
        device_sync(d)


class UnitClock:
    """Forward hooks on every decoder layer; `split(t0, t1)` turns one step's marks into unit seconds.

    A layer on CUDA is synchronised before each mark, so its time is the kernels it ran, not their
    launch (the headline figures synchronise only at the ends of each step).
    """

    def __init__(self, net):
        self.n = len(net.layers)
        self.start = [0.0] * self.n
        self.end = [0.0] * self.n
        self.handles = []
        # a MoE layer's experts unit runs inside its layer: timed apart, taken off the layer's span
        self.banks = [getattr(getattr(layer, "template", layer), "experts", None) for layer in net.layers]
        self.moe = any(b is not None for b in self.banks)
        self.bank_s = [0.0] * self.n
        for i, layer in enumerate(net.layers):
            dev = str(getattr(layer, "device", "cpu"))
            self.handles.append(layer.register_forward_pre_hook(self._pre(i, dev)))
            self.handles.append(layer.register_forward_hook(self._post(i, dev)))
            if self.banks[i] is not None:
                self.handles += self._bank_hooks(i, self.banks[i])
        self.devices = net_devices(net)

    def _bank_hooks(self, i, bank):
        dev = str(getattr(bank, "device", "cpu"))
        began = [0.0]

        def pre(_m, _args):
            device_sync(dev)
            began[0] = time.perf_counter()

        def post(_m, _args, _out):
            device_sync(dev)
            self.bank_s[i] = time.perf_counter() - began[0]
        return [bank.register_forward_pre_hook(pre), bank.register_forward_hook(post)]

    def _pre(self, i, dev):
        def hook(_m, _args):
            device_sync(dev)  # what an earlier unit queued is its time, not this one's
            self.start[i] = time.perf_counter()
        return hook

    def _post(self, i, dev):
        def hook(_m, _args, _out):
            device_sync(dev)
            self.end[i] = time.perf_counter()
        return hook

    def sync(self) -> None:
        sync_all(self.devices)

    def split(self, t0: float, t1: float) -> list[float]:
        """Seconds per unit in spec.unit_names() order ([embed, layers.0 .. layers.n-1, head]; a MoE
        model's layers.i then layers.i.experts); gaps between layers go to the next layer."""
        s, e = self.start, self.end
        spans = [s[i + 1] - s[i] for i in range(self.n - 1)] + [e[-1] - s[-1]]
        out = [s[0] - t0]
        for i, span in enumerate(spans):
            out += [span - self.bank_s[i], self.bank_s[i]] if self.moe else [span]
            self.bank_s[i] = 0.0
        return out + [t1 - e[-1]]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux clear_refs 5), so a later peak covers only what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def prompt_ids(vocab: int, n: int, seed: int = 0) -> torch.Tensor:
    """[1, n] seeded random token ids, clear of the low ids tokenizers reserve for special tokens."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(min(100, vocab - 1), vocab, (1, n), generator=g)


def _prefill(net, ids: torch.Tensor, cache) -> int:
    logits = None
    for s in range(0, ids.shape[1], CHUNK):
        logits = net(ids[:, s:s + CHUNK], s, cache)
    return int(logits[0].argmax())


def _one_pass(net, ids, cache, first: int, new_tokens: int, clock: UnitClock | None = None):
    """(ttft s, [decode step s], prefill unit split, [decode unit splits])."""
    P = ids.shape[1]
    devs = net_devices(net)
    sync_all(devs)
    t0 = time.perf_counter()
    if clock is None:
        tok = _prefill(net, ids, cache)
        ttft = time.perf_counter() - t0
        pre_split = None
    else:  # chunk by chunk, so each chunk's marks are read before the next overwrites them
        tok, pre_split = 0, None
        for s in range(0, P, CHUNK):
            c0 = time.perf_counter()
            logits = net(ids[:, s:s + CHUNK], s, cache)
            clock.sync()
            tok = int(logits[0].argmax())
            part = clock.split(c0, time.perf_counter())
            pre_split = part if pre_split is None else [a + b for a, b in zip(pre_split, part)]
        ttft = time.perf_counter() - t0
    steps, splits = [], []
    x = torch.tensor([[tok]], dtype=torch.long)
    for i in range(new_tokens):
        sync_all(devs)
        t = time.perf_counter()
        logits = net(x, first + i, cache)
        x = logits.argmax(-1, keepdim=True)  # greedy: the cheapest token choice, as the head prices
        sync_all(devs)
        t1 = time.perf_counter()
        steps.append(t1 - t)
        if clock is not None:
            splits.append(clock.split(t, t1))
    return ttft, steps, pre_split, splits


def measure_engine(engine, prompt_tokens: int = 512, new_tokens: int = 128, context: int | None = None,
                   repeats: int = 3, warmup: int = 1, unit_split: bool = True, seed: int = 0,
                   advance=None) -> Measured:
    """Time `engine` (a hetero.runtime.engine.Engine, or anything with .model.net and .footprint())."""
    from hetero.runtime.memory import Footprint

    net = engine.model.net
    spec = net.spec
    engine.footprint()  # fold the loading peak into the whole-process figure before resetting it
    run_mon = Footprint(list(getattr(engine.monitor, "files", []))) if reset_peak_rss() else None
    if run_mon is not None:
        run_mon.start()
    P, N = int(prompt_tokens), int(new_tokens)
    C = max(int(context or 0), P + N)
    first = max(P, C - N)
    ids = prompt_ids(spec.vocab_size, P, seed)
    cache = net.new_cache(1, first + N)
    ttfts, pre, dec, dec_mean = [], [], [], []
    with torch.inference_mode():
        for r in range(warmup + repeats):
            ttft, steps, _, _ = _one_pass(net, ids, cache, first, N if r >= warmup else min(N, 4))
            if advance:
                advance()
            if r < warmup:
                continue
            ttfts.append(ttft)
            pre.append(P / ttft)
            # the median step: one step preempted by another process must not move the figure
            dec.append(1.0 / statistics.median(steps))
            dec_mean.append(len(steps) / sum(steps))
        units = spec.unit_names()
        m = Measured(P, N, C, Stat.of(ttfts), Stat.of(pre), Stat.of(dec), decode_tok_s_mean=Stat.of(dec_mean))
        if unit_split:
            clock = UnitClock(net)
            try:
                _, _, pre_split, splits = _one_pass(net, ids, cache, first, N, clock)
            finally:
                clock.remove()
            # per unit: the median over steps, then scaled so the units sum to the un-hooked median step
            dsplit = [statistics.median(col) for col in zip(*splits)]
            scale_d = (1.0 / m.decode_tok_s.median) / sum(dsplit)
            scale_p = m.ttft_s.median / sum(pre_split)
            m.unit_decode_ms = {u: round(t * scale_d * 1e3, 6) for u, t in zip(units, dsplit)}
            m.unit_prefill_ms = {u: round(t * scale_p * 1e3, 6) for u, t in zip(units, pre_split)}
    m.footprint_bytes = dict(engine.footprint())
    if run_mon is not None:
        m.footprint_run_bytes = {**m.footprint_bytes, "cpu": run_mon.stop()}
    return m


# ---- predicted vs measured -----------------------------------------------------------------------

def rel_error(pred: float, meas: float) -> float | None:
    """(predicted - measured) / measured; None when nothing was measured."""
    return (pred - meas) / meas if meas else None


def predicted_of(plan) -> dict:
    """The plan's predictions in the shape of `Measured` (tok/s, ms per unit, footprint incl. reserve)."""
    p = plan.predicted
    fp = {d: plan.memory.get(d, 0) + plan.reserve.get(d, 0) for d in plan.memory
          if plan.memory.get(d, 0) or d in plan.reserve}
    return {"ttft_s": p.ttft_s, "prefill_tok_s": p.prefill_tok_s, "decode_tok_s": p.decode_tok_s,
            "unit_decode_ms": {u.name: u.predicted_ms for u in plan.units},
            "unit_prefill_ms": {u.name: u.prefill_ms for u in plan.units},
            "footprint_bytes": fp}


def compare(plan, m: Measured) -> dict:
    """{"predicted", "measured", "error"}: errors relative to measured, per metric and per unit."""
    from hetero.ops import kernels

    pred = predicted_of(plan)
    meas = {"decode_act": kernels.decode_act(), "ttft_s": m.ttft_s.median, "prefill_tok_s": m.prefill_tok_s.median,
            "decode_tok_s": m.decode_tok_s.median,
            "decode_tok_s_mean": m.decode_tok_s_mean.median if m.decode_tok_s_mean else None,
            "unit_decode_ms": m.unit_decode_ms,
            "unit_prefill_ms": m.unit_prefill_ms, "footprint_bytes": m.footprint_bytes,
            "footprint_run_bytes": m.footprint_run_bytes}
    err = {k: rel_error(pred[k], meas[k]) for k in ("ttft_s", "prefill_tok_s", "decode_tok_s")}
    err["footprint_bytes"] = {d: rel_error(pred["footprint_bytes"].get(d, 0), v)
                              for d, v in m.footprint_bytes.items() if d in pred["footprint_bytes"]}
    err["footprint_run_bytes"] = {d: rel_error(pred["footprint_bytes"].get(d, 0), v)
                                  for d, v in m.footprint_run_bytes.items() if d in pred["footprint_bytes"]}
    for k in ("unit_decode_ms", "unit_prefill_ms"):
        err[k] = {u: rel_error(pred[k].get(u, 0.0), v) for u, v in meas[k].items()}
    spread = {"ttft_s": m.ttft_s.spread, "prefill_tok_s": m.prefill_tok_s.spread,
              "decode_tok_s": m.decode_tok_s.spread}
    return {"predicted": pred, "measured": {**meas, "spread": spread, "repeats": m.decode_tok_s.n,
                                            "ranges": {k: [getattr(m, k).min, getattr(m, k).max]
                                                       for k in ("ttft_s", "prefill_tok_s", "decode_tok_s")}},
            "error": err}
