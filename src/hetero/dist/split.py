"""Cut a model into contiguous pipeline stages, one per rank, sized by each rank's speed and memory.

Per-unit times come from the cost model (hetero.cost.compute_time on the rank's device rates); the
split minimises the slowest stage (compute + its outgoing activation transfer), which sets the
pipelined throughput, then the summed stage time (single-sequence latency), under every rank's
memory (weights + KV cache of every sequence in flight + prefill workspace). An exact dynamic
programme over (rank, first unit): units ≤ ~100, ranks ≤ ~16, so it is instant.

Prediction with M micro-batches of b sequences in flight and stage times t_s (incl. sends):
    cycle = max(M · max_s t_s, Σ_s t_s)      (the bottleneck stage is saturated once M ≥ stages)
    throughput = M · b / cycle  tokens/s
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hetero import cost
from hetero.cost import Coefficients, DeviceRates, Link
from hetero.dist.hosts import Host, Hosts
from hetero.errors import HeteroError
from hetero.hardware.types import HardwareSpec, Profile
from hetero.model.spec import ModelSpec


@dataclass(frozen=True)
class RankSpeed:
    """What one rank computes on: its host, device, effective rates and memory budget."""
    rank: int
    host: Host
    device: str
    rates: DeviceRates
    memory: int


@dataclass(frozen=True)
class StageSplit:
    rank: int
    host: str
    device: str
    first: str                  # first unit name (inclusive)
    last: str                   # last unit name (inclusive)
    units: tuple[str, ...]
    weight_bytes: int
    kv_bytes: int
    memory_budget: int
    step_s: float               # one decode step of one micro-batch (compute only)
    send_s: float               # activations to the next rank (the last: token ids back to rank 0)
    prefill_s: float            # prefill of the prompt for one micro-batch (compute only)
    prefill_send_s: float

    @property
    def layers(self) -> int:
        return sum(u.startswith("layers.") and not u.endswith(".experts") for u in self.units)


@dataclass(frozen=True)
class Split:
    model: str
    precision: str
    micro_batch: int            # sequences per micro-batch (b)
    in_flight: int              # micro-batches in flight (M)
    prompt_tokens: int
    context: int
    stages: tuple[StageSplit, ...]

    def layer_counts(self) -> list[int]:
        return [s.layers for s in self.stages]

    def plan_stages(self):
        """The planner's data model: hetero.plan.Stage(host, first, last, rank) per stage."""
        from hetero.plan.plan import Stage

        return tuple(Stage(s.host, s.first, s.last, s.rank) for s in self.stages)

    def predict(self, in_flight: int | None = None) -> dict[str, float]:
        """Predicted decode tok/s for one micro-batch alone, pipelined throughput, and prefill tok/s."""
        m = in_flight or self.in_flight
        t = [s.step_s + s.send_s for s in self.stages]
        latency = sum(t)
        cycle = max(m * max(t), latency)
        pre = sum(s.prefill_s + s.prefill_send_s for s in self.stages)
        return {"decode_tok_s": self.micro_batch / latency, "step_ms": latency * 1e3,
                "bottleneck_ms": max(t) * 1e3, "throughput_tok_s": m * self.micro_batch / cycle,
                "in_flight": m, "prefill_tok_s": self.micro_batch * self.prompt_tokens / pre if pre else 0.0}

    def to_dict(self) -> dict:
        return {**{k: v for k, v in dataclasses.asdict(self).items() if k != "stages"},
                "stages": [dataclasses.asdict(s) for s in self.stages], "predicted": self.predict()}


# ---- rank speeds -------------------------------------------------------------------------------

def _scaled(r: DeviceRates, f: float) -> DeviceRates:
    return dataclasses.replace(r, gemm={p: v * f for p, v in r.gemm.items()},
                               gemv={p: v * f for p, v in r.gemv.items()}, mem=r.mem * f)


def _hardware(host: Host, this: tuple[HardwareSpec, Profile | None] | None) -> tuple[HardwareSpec, Profile | None]:
    if host.hardware == "this":
        if this is not None:
            return this
        from hetero.hardware.inventory import host_name, inventory
        from hetero.hardware.profile import load_cached

        return inventory(), load_cached(host_name())
    from hetero.hardware.catalog import resolve

    return resolve(host.hardware), None


def rank_speeds(hosts: Hosts, this: tuple[HardwareSpec, Profile | None] | None = None,
                per_rank_profile: bool = False, coeffs: Coefficients | None = None) -> list[RankSpeed]:
    """Every rank's device, rates and memory. Ranks sharing a host share its device: their rates and
    memory are divided among them, unless `per_rank_profile` says `this` was measured at one rank's
    thread count already (then only memory is divided)."""
    out = []
    cache: dict[str, tuple] = {}
    rank = 0
    for h in hosts.hosts:
        if h.hardware not in cache:
            cache[h.hardware] = _hardware(h, this)
        hw, prof = cache[h.hardware]
        rates = cost.device_rates(hw, prof, coeffs)
        for k in range(h.ranks):
            # the k-th rank takes the host's k-th named device; else its first GPU; else the CPU
            dev = h.devices[k % len(h.devices)] if h.devices else next((d for d in rates if d.startswith("cuda")), "cpu")
            if dev not in rates:
                raise HeteroError(f"host {h.address} has no compute device {dev!r}; it has: {', '.join(rates)}")
            sharing = sum(1 for j in range(h.ranks) if (h.devices[j % len(h.devices)] if h.devices else dev) == dev)
            r = rates[dev]
            if sharing > 1 and not (per_rank_profile and h.hardware == "this"):
                r = _scaled(r, 1.0 / sharing)
            spec_dev = hw.device(dev)
            mem = h.memory or (spec_dev.available_bytes or spec_dev.memory_bytes) // sharing
            out.append(RankSpeed(rank, h, dev, r, mem))
            rank += 1
    return out


# ---- the split ---------------------------------------------------------------------------------

def split_model(spec: ModelSpec, hosts: Hosts, speeds: list[RankSpeed], precision: str = "fp32",
                micro_batch: int = 1, in_flight: int = 1, prompt_tokens: int = 128, context: int = 256,
                layers: list[int] | None = None, coeffs: Coefficients | None = None,
                fit_memory: bool = True) -> Split:
    """The best contiguous split of spec's units over the ranks (or the one `layers` fixes: decoder
    layers per stage, the embedding on the first stage and the head on the last). fit_memory False:
    balance by time alone (a rank's planner streams from disk what its budget cannot hold)."""
    coeffs = coeffs or Coefficients()
    units = spec.unit_names()
    R, U = len(speeds), len(units)
    if R < 1:
        raise HeteroError("a pipeline needs at least one rank")
    if U < R:
        raise HeteroError(f"{spec.name} has {U} units, fewer than the {R} ranks asked for")
    for s in speeds:
        if precision not in s.rates.precisions:
            raise HeteroError(f"rank {s.rank} ({s.host.address}, {s.device}) has no {precision} kernels; "
                              f"it has: {', '.join(s.rates.precisions)}")
    full = cost.unit_bytes_table(spec, [precision])
    rank_hosts = [s.host for s in speeds]
    seqs = micro_batch * in_flight
    wbytes = [full[(u, precision)] for u in units]
    kv = [cost.kv_bytes(spec, u, precision, context, seqs) for u in units]
    step = [[cost.compute_time(spec, u, s.rates, precision, full[(u, precision)], 1, context, micro_batch, coeffs)
             for u in units] for s in speeds]
    pre = [[cost.compute_time(spec, u, s.rates, precision, full[(u, precision)], prompt_tokens, prompt_tokens,
                              micro_batch, coeffs) for u in units] for s in speeds]
    work = cost.workspace_bytes(spec, prompt_tokens, micro_batch, dequant=precision == "int4")

    def link(r: int) -> Link:
        nxt = rank_hosts[(r + 1) % R]
        li = hosts.link(rank_hosts[r], nxt)
        return Link(((li.bandwidth, li.latency_s),)) if R > 1 else Link(())

    act = cost.activation_bytes(spec, 1, micro_batch, coeffs)
    act_pre = cost.activation_bytes(spec, prompt_tokens, micro_batch, coeffs)
    send = [link(r).time(act if r < R - 1 else 8 * micro_batch) for r in range(R)]
    send_pre = [link(r).time(act_pre if r < R - 1 else 8 * micro_batch) for r in range(R)]

    def stage_cost(r: int, i: int, j: int) -> tuple[float, int]:
        if (0 < i < U and spec.is_experts_unit(units[i])) or (j < U and spec.is_experts_unit(units[j])):
            return float("inf"), 1 << 62   # a MoE layer and its experts unit run on one rank
        return sum(step[r][i:j]) + send[r], sum(wbytes[i:j]) + sum(kv[i:j]) + work

    if layers is not None:
        bounds = _fixed_bounds(spec, layers, R)
    else:
        budgets = [s.memory if fit_memory else float("inf") for s in speeds]
        bounds = _best_bounds(R, U, stage_cost, budgets, spec, precision)
    stages = []
    for r, (i, j) in enumerate(bounds):
        s = speeds[r]
        stages.append(StageSplit(
            rank=r, host=s.host.address, device=s.device, first=units[i], last=units[j - 1],
            units=tuple(units[i:j]), weight_bytes=sum(wbytes[i:j]), kv_bytes=sum(kv[i:j]),
            memory_budget=s.memory, step_s=sum(step[r][i:j]), send_s=send[r],
            prefill_s=sum(pre[r][i:j]), prefill_send_s=send_pre[r]))
    return Split(spec.name, precision, micro_batch, in_flight, prompt_tokens, context, tuple(stages))


def _fixed_bounds(spec: ModelSpec, layers: list[int], R: int) -> list[tuple[int, int]]:
    if len(layers) != R or any(n < 0 for n in layers) or sum(layers) != spec.n_layers:
        raise HeteroError(f"--layers must give {R} counts summing to {spec.n_layers} (the model's layers), "
                          f"got {','.join(map(str, layers))}")
    bounds, i = [], 0
    for r, n in enumerate(layers):
        per = 2 if spec.is_moe else 1   # a MoE layer is two units: layers.i and layers.i.experts
        j = i + per * n + (1 if r == 0 else 0) + (1 if r == R - 1 else 0)  # + embed on the first, + head on the last
        bounds.append((i, j))
        i = j
    return bounds


def _best_bounds(R: int, U: int, stage_cost, budgets: list[int], spec: ModelSpec, precision: str
                 ) -> list[tuple[int, int]]:
    """best[r][j]: (bottleneck, total) placing units [0, j) on ranks 0..r, each rank ≥ 1 unit."""
    INF = (float("inf"), float("inf"))
    best = [[INF] * (U + 1) for _ in range(R)]
    arg = [[-1] * (U + 1) for _ in range(R)]
    for j in range(1, U - R + 2):
        t, m = stage_cost(0, 0, j)
        if m <= budgets[0]:
            best[0][j], arg[0][j] = (t, t), 0
    for r in range(1, R):
        for j in range(r + 1, U - (R - 1 - r) + 1):
            for i in range(r, j):
                prev = best[r - 1][i]
                if prev == INF:
                    continue
                t, m = stage_cost(r, i, j)
                if m > budgets[r]:
                    continue
                cand = (max(prev[0], t), prev[1] + t)
                if cand < best[r][j]:
                    best[r][j], arg[r][j] = cand, i
    if best[R - 1][U] == INF:
        need = stage_cost(0, 0, U)[1]
        raise HeteroError(f"{spec.name} at {precision} does not fit these ranks' memory "
                          f"({', '.join(f'{b / 1e9:.2f} GB' for b in budgets)}; the whole model needs "
                          f"{need / 1e9:.2f} GB with KV cache and workspace)")
    bounds, j = [], U
    for r in range(R - 1, -1, -1):
        i = arg[r][j]
        bounds.append((i, j))
        j = i
    return bounds[::-1]
