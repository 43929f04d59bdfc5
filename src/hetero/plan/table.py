"""The choice table: every unit's cost under every (device, precision, residency), and the exact
evaluation of one full assignment.

The solver, the baselines, brute force and Plan re-scoring all read costs from here and score
assignments with `Table.evaluate`, so they cannot disagree about what a plan costs or whether it fits.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hetero import cost
from hetero.cost import Coefficients
from hetero.dtypes import BLOCK_PRECISIONS, QUANTISABLE_BLOCKS, check_kv_dtype
from hetero.errors import HeteroError
from hetero.hardware.types import HardwareSpec, Profile
from hetero.model.spec import ModelSpec

OBJECTIVES: tuple[str, ...] = ("decode", "ttft", "throughput")


@dataclass(frozen=True)
class Choice:
    device: str       # compute device
    precision: str
    residency: str    # resident | ram | disk


@dataclass(frozen=True)
class Workload:
    objective: str = "decode"
    prompt_tokens: int = 512
    context: int = 640        # tokens of history at the decode step being priced
    batch: int = 1
    kv_dtype: str = "auto"    # how the KV cache is stored (dtypes.KV_DTYPES): int8 holds ~2x the tokens
    ragged: bool = False      # the batch runs in a batch runner (runtime/batch.py): prompts prefill in
                              # chunks one after another, decode steps take one row per sequence

    @property
    def new_tokens(self) -> int:
        return max(1, self.context - self.prompt_tokens)

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise HeteroError(f"unknown objective {self.objective!r}; use one of: {', '.join(OBJECTIVES)}")
        if self.prompt_tokens < 1 or self.batch < 1 or self.context < 1:
            raise HeteroError("prompt tokens, context and batch must be positive")
        check_kv_dtype(self.kv_dtype)


@dataclass
class Evaluation:
    """What one assignment costs and holds."""
    decode_s: float                       # one decode step (all units + boundary transfers)
    prefill_s: float                      # prefill of the prompt
    objective_s: float
    memory: dict[str, int]                # memory device -> bytes
    breakdown: dict[str, dict[str, int]]  # memory device -> weights / kv / buffers / workspace
    quality: float
    unit_decode_s: list[float]
    unit_prefill_s: list[float]
    switches: int = 0

    def over(self, budgets: dict[str, int]) -> dict[str, int]:
        """Memory devices whose use exceeds their budget, with the excess in bytes."""
        return {m: self.memory.get(m, 0) - b for m, b in budgets.items() if self.memory.get(m, 0) > b}


@dataclass
class Table:
    spec: ModelSpec
    hw: HardwareSpec
    workload: Workload
    coeffs: Coefficients
    prefetch: bool
    units: list[str]
    choices: list[Choice]
    compute: list[str]                    # compute device names
    mem_of: dict[str, str]                # compute device -> memory device its memory counts against
    memory_devices: list[str]
    disk: str | None
    host: str                             # where token ids start and end
    decode: np.ndarray                    # [U, K] seconds, incl. streaming and host<->device ends
    prefill: np.ndarray                   # [U, K]
    decode_serial: np.ndarray             # [U, K] the same without prefetch (transfer, then compute)
    prefill_serial: np.ndarray
    weights: dict[str, np.ndarray]        # memory device -> [U, K] bytes (weights + KV cache)
    weights_only: dict[str, np.ndarray]   # memory device -> [U, K] weight bytes (for reports)
    pools: dict[str, np.ndarray]          # memory device -> [U, K] prefetch-pool bytes (pool = max)
    quality: np.ndarray                   # [U, K]
    act_decode: dict[tuple[str, str], float]
    act_prefill: dict[tuple[str, str], float]
    workspace: dict[str, int]             # compute device -> activation workspace bytes when it runs any unit
    tied: bool
    unit_bytes: np.ndarray                # [U, K] weight bytes at the chosen precision
    valid: np.ndarray = field(default=None)  # [U, K] bool

    # ---- objective pieces ------------------------------------------------------------------------
    def objective_weights(self) -> tuple[float, float]:
        """(weight of prefill seconds, weight of decode-step seconds) in the objective."""
        o = self.workload.objective
        if o == "ttft":
            return 1.0, 0.0
        if o == "throughput":
            return 1.0, float(self.workload.new_tokens)
        return 0.0, 1.0

    def unit_objective(self) -> np.ndarray:
        wp, wd = self.objective_weights()
        return wp * self.prefill + wd * self.decode

    def boundary_objective(self, d: str, e: str) -> float:
        wp, wd = self.objective_weights()
        return wp * self.act_prefill[(d, e)] + wd * self.act_decode[(d, e)]

    def index(self, choice: Choice) -> int:
        try:
            return self.choices.index(choice)
        except ValueError:
            raise HeteroError(f"{choice.device}/{choice.precision}/{choice.residency} is not a possible "
                              "choice on this hardware") from None

    # ---- exact evaluation ------------------------------------------------------------------------
    def evaluate(self, assign: list[int], prefetch: bool | None = None) -> Evaluation:
        """Exact cost and memory of one choice per unit (`prefetch` False: streamed units run serially)."""
        prefetch = self.prefetch if prefetch is None else prefetch
        U = len(self.units)
        if len(assign) != U:
            raise ValueError("one choice per unit")
        ks = np.asarray(assign)
        rows = np.arange(U)
        if not self.valid[rows, ks].all():
            bad = self.units[int(np.flatnonzero(~self.valid[rows, ks])[0])]
            raise HeteroError(f"unit {bad}: the choice is not allowed here")
        if not tied_consistent(self, assign):
            raise HeteroError("embed and head share their matrix (tied embeddings): give them one choice")
        devs = [self.choices[k].device for k in ks]
        dec_b = pre_b = 0.0
        switches = 0
        for a, b in zip(devs, devs[1:]):
            if a != b:
                switches += 1
                dec_b += self.act_decode[(a, b)]
                pre_b += self.act_prefill[(a, b)]
        unit_dec = (self.decode if prefetch else self.decode_serial)[rows, ks]
        unit_pre = (self.prefill if prefetch else self.prefill_serial)[rows, ks]
        decode_s = float(unit_dec.sum() + dec_b)
        prefill_s = float(unit_pre.sum() + pre_b)
        wp, wd = self.objective_weights()
        memory, breakdown = {}, {}
        used = set(devs)
        for m in self.memory_devices:
            w = int(round(self.weights_only[m][rows, ks].sum()))
            kv = int(round(self.weights[m][rows, ks].sum())) - w
            buf = int(round(self.pools[m][rows, ks].max())) if m in self.pools else 0
            ws = sum(self.workspace[d] for d in used if self.mem_of[d] == m)
            memory[m] = w + kv + buf + ws
            breakdown[m] = {"weights": w, "kv": kv, "buffers": buf, "workspace": ws}
        return Evaluation(decode_s, prefill_s, wp * prefill_s + wd * decode_s, memory, breakdown,
                          float(self.quality[rows, ks].sum()), unit_dec.tolist(), unit_pre.tolist(), switches)


def build_table(spec: ModelSpec, hw: HardwareSpec, profile: Profile | None, workload: Workload,
                precisions: list[str] | None = None, sensitivity: dict | None = None,
                coeffs: Coefficients | None = None, prefetch: bool = True,
                units: list[str] | tuple[str, ...] | None = None) -> Table:
    """Price every (unit, choice) pair once; the solver and every scorer read from the result.

    units: a contiguous run of the model's units (a pipeline stage) instead of all of them."""
    from hetero.plan.sensitivity import quality_table

    workload.validate()
    coeffs = coeffs or Coefficients()
    rates = cost.device_rates(hw, profile, coeffs)
    if not rates:
        raise HeteroError(f"{hw.host} has no compute device")
    disk = cost.disk_device(hw)
    disk_bw = cost.disk_rate(hw, profile, coeffs)
    overlap = cost.overlap_of(profile, coeffs)
    compute = list(rates)
    mem_of = {d.name: (getattr(d, "shares_memory_with", "") or d.name) for d in hw.compute_devices()}
    memory_devices = list(dict.fromkeys([*mem_of.values(), *([disk.name] if disk else [])]))
    host = "cpu" if "cpu" in rates else compute[0]
    host_mem = mem_of[host]
    allowed = set(precisions) if precisions else None
    runnable = spec.runnable_precisions()

    choices: list[Choice] = []
    for d, r in rates.items():
        for p in r.precisions:
            if allowed is not None and p not in allowed:
                continue
            if p not in runnable:
                continue  # e.g. native for a model of dense tensors: no stored block format to keep
            for res in cost.RESIDENCIES:
                if res == "ram" and mem_of[d] == host_mem:
                    continue  # the weights already live in the memory this device computes from
                if res == "disk" and disk is None:
                    continue
                choices.append(Choice(d, p, res))
    if not choices:
        raise HeteroError(f"no device here has kernels for {', '.join(sorted(allowed or []))}")

    units = stage_units(spec, units)
    U, K = len(units), len(choices)
    P, C, B = workload.prompt_tokens, workload.context, workload.batch
    links = {(a, b): cost.link(hw, profile, a, b, coeffs) for a in compute for b in compute}
    decode, prefill = np.zeros((U, K)), np.zeros((U, K))
    decode_serial, prefill_serial = np.zeros((U, K)), np.zeros((U, K))
    weights = {m: np.zeros((U, K)) for m in memory_devices}
    weights_only = {m: np.zeros((U, K)) for m in memory_devices}
    pools = {m: np.zeros((U, K)) for m in memory_devices if m != (disk.name if disk else None)}
    quality, nbytes = np.zeros((U, K)), np.zeros((U, K))
    valid = np.ones((U, K), dtype=bool)
    ids = 8 * B  # token ids in, sampled ids out
    # one shared matrix only when both ends are here: a stage holding one of them holds it whole
    tied = spec.tie_embeddings and "embed" in units and "head" in units
    sizes = cost.unit_bytes_table(spec, sorted({c.precision for c in choices}))
    qtab = quality_table(spec, sorted({c.precision for c in choices}), sensitivity)
    for k, ch in enumerate(choices):
        if ch.precision in BLOCK_PRECISIONS and ch.precision not in QUANTISABLE_BLOCKS:
            # a format hetero cannot quantise to runs only where the unit's matrices are stored in it
            valid[:, k] = [spec.stored_as(unit, ch.precision) for unit in units]
        r, home = rates[ch.device], mem_of[ch.device]
        hl = links[(host, ch.device)]
        for u, unit in enumerate(units):
            wb = sizes[(unit, ch.precision)]
            nbytes[u, k] = wb
            # the head produces the next token from the last prompt position only
            ptok = 1 if unit == "head" else P
            c_dec = cost.compute_time(spec, unit, r, ch.precision, wb, 1, C, B, coeffs)
            c_pre = cost.compute_time(spec, unit, r, ch.precision, wb, ptok, P, B, coeffs)
            t_dec = cost.transfer_time(spec, unit, wb, ch.residency, ch.device, 1, B, disk_bw, hl, coeffs)
            t_pre = cost.transfer_time(spec, unit, wb, ch.residency, ch.device, ptok, B, disk_bw, hl, coeffs)
            ends = hl.time(ids) if unit in ("embed", "head") else 0.0  # ids from / to the host
            decode[u, k] = cost.overlapped(c_dec, t_dec, prefetch, overlap) + ends
            prefill[u, k] = cost.overlapped(c_pre, t_pre, prefetch, overlap) + ends
            decode_serial[u, k] = c_dec + t_dec + ends
            prefill_serial[u, k] = c_pre + t_pre + ends
            # A tied embedding reads its rows from the head's matrix (runtime.embedding.TiedEmbedding).
            held = 0 if (tied and unit == "embed") else wb
            kv = cost.kv_bytes(spec, unit, ch.precision, C, B, workload.kv_dtype)
            weights[home][u, k] += kv
            if ch.residency == "resident":
                weights[home][u, k] += held
                weights_only[home][u, k] += held
            elif ch.residency == "ram":
                weights[host_mem][u, k] += held
                weights_only[host_mem][u, k] += held
                pools[home][u, k] = cost.buffer_bytes(spec, unit, wb, P, B, coeffs)
            else:
                weights[disk.name][u, k] += held
                weights_only[disk.name][u, k] += held
                buf = cost.buffer_bytes(spec, unit, wb, P, B, coeffs)
                pools[host_mem][u, k] = max(pools[host_mem][u, k], buf)  # O_DIRECT staging in RAM
                if home != host_mem:
                    pools[home][u, k] = buf
            quality[u, k] = qtab[(unit, ch.precision)]
    act_decode = _shortest({(a, b): links[(a, b)].time(cost.activation_bytes(spec, 1, B, coeffs))
                            for a in compute for b in compute if a != b}, compute)
    act_prefill = _shortest({(a, b): links[(a, b)].time(cost.activation_bytes(spec, P, B, coeffs))
                             for a in compute for b in compute if a != b}, compute)
    # a CPU that may run int4 or a GGUF block format also holds the block its prefill dequantises at a time
    kinds = {d.name: d.kind for d in hw.devices}
    workspace = {d: cost.workspace_bytes(spec, P, B, dequant=kinds.get(d) == "cpu" and any(
        c.device == d and (c.precision == "int4" or c.precision in BLOCK_PRECISIONS or c.precision == "native")
        for c in choices), ragged=coeffs.prefill_chunk if workload.ragged else 0) for d in compute}
    return Table(spec, hw, workload, coeffs, prefetch, units, choices, compute, mem_of, memory_devices,
                 disk.name if disk else None, host, decode, prefill, decode_serial, prefill_serial, weights, weights_only, pools, quality,
                 act_decode, act_prefill, workspace, tied, nbytes, valid)


def stage_units(spec: ModelSpec, units=None) -> list[str]:
    """All of the model's units, or the contiguous run `units` (checked: a stage is one slice)."""
    every = spec.unit_names()
    if units is None:
        return every
    units = list(units)
    if not units or units[0] not in every:
        raise HeteroError(f"a stage needs units of {spec.name}, got {', '.join(units) or 'none'}")
    i = every.index(units[0])
    if every[i:i + len(units)] != units:
        raise HeteroError(f"the units {units[0]}..{units[-1]} are not a contiguous run of {spec.name}'s units")
    return units


def _shortest(c: dict[tuple[str, str], float], nodes: list[str]) -> dict[tuple[str, str], float]:
    """Activations take the fastest route between devices (possibly through a third one), which
    also makes boundary costs obey the triangle inequality the solver's segment model relies on."""
    c = dict(c)
    for via in nodes:
        for a in nodes:
            for b in nodes:
                if a != b and via not in (a, b) and c[(a, via)] + c[(via, b)] < c[(a, b)]:
                    c[(a, b)] = c[(a, via)] + c[(via, b)]
    return c


def tied_consistent(table: Table, assign: list[int]) -> bool:
    """With tied embeddings embed and head share one matrix, hence one choice."""
    return not table.tied or assign[0] == assign[-1]
