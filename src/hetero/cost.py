"""The cost model: pure functions from (ModelSpec, HardwareSpec, Profile, one choice) to seconds and bytes.

A choice is where one unit (embed, layers.i, head) runs: a compute device, a precision, and a
residency — where its weights live between uses:
    resident  in the compute device's own memory
    ram       in host RAM, copied to a GPU ahead of use (pinned buffers, a side stream)
    disk      on disk, read with O_DIRECT ahead of use (then over the link when the device is a GPU)

Times follow the roofline: max(FLOPs / rate, bytes / bandwidth) + per-op overhead x ops. Streamed
units overlap their transfer with compute (prefetch): max(compute, transfer), blended towards the
serial sum by `overlap` < 1. Rates come from the measured Profile when there is one, else from the
spec sheet times the efficiency factors below. Every coefficient lives in `Coefficients`, and the
fitted multipliers of `Profile.calibration` scale them (see `calibrated`), so that calibration can
fit them without touching this code. Nothing here probes hardware or imports torch.
"""
from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field

from hetero.dtypes import BLOCK_PRECISIONS, DEQUANT_BYTES_PER_ELEMENT, DEQUANT_ELEMENTS, NATIVE, PRECISIONS
from hetero.hardware.types import DeviceSpec, HardwareSpec, Profile
from hetero.model.spec import ModelSpec

RESIDENCIES: tuple[str, ...] = ("resident", "ram", "disk")


def _by_kind(**kw: float) -> dict[str, float]:
    return dict(kw)


@dataclass(frozen=True)
class Coefficients:
    """Every tunable number of the cost model, in one place (issue: calibration fits these)."""
    # Fraction of a spec-sheet figure reached in practice, used only when nothing was measured.
    # cpu gemv 0.33: torch's M=1 matmuls stream ~10 of ~30 GB/s here (docs/DESIGN facts).
    gemm_eff: dict[str, float] = field(default_factory=lambda: _by_kind(cpu=0.5, cuda=0.6, mps=0.4, xpu=0.5))
    gemv_eff: dict[str, float] = field(default_factory=lambda: _by_kind(cpu=0.33, cuda=0.75, mps=0.6, xpu=0.6))
    # A batched decode step's rows (M = B <= rows_max) vs the prefill GEMM's FLOP rate, used only when
    # the profile has no gemm_rows figure (a catalog machine): the CPU row kernels (ops/kernels
    # gemm_rows) keep each row's GEMV arithmetic, far from a tiled GEMM's rate.
    rows_eff: dict[str, float] = field(default_factory=lambda: _by_kind(cpu=0.03, cuda=0.3, mps=0.3, xpu=0.3))
    rows_max: int = 32                # rows the small-M kernels take (ops.native.SMALL_M); more: the GEMM
    mem_eff: dict[str, float] = field(default_factory=lambda: _by_kind(cpu=0.6, cuda=0.8, mps=0.7, xpu=0.7))
    # An eager elementwise op into fresh pages (a training step's transients) vs the streaming read
    # rate, when the profile has no eager_bandwidth: page faults and the op's fork/join dominate it.
    eager_eff: dict[str, float] = field(default_factory=lambda: _by_kind(cpu=0.1, cuda=0.5, mps=0.5, xpu=0.5))
    # Weight-only quantised matmuls dequantise on the fly: their FLOP rate relative to bf16's.
    # GGUF block formats dequantise a block of rows to bf16 per GEMM (hetero.ops.native).
    quant_gemm: dict[str, float] = field(default_factory=lambda: {
        "int8": 0.8, "int4": 0.5, **{p: 0.5 for p in BLOCK_PRECISIONS}})
    # Prefill rate vs matrix size: a unit's matmuls run at rate x (elements / probe elements)^-alpha.
    # The profile measures one GEMM shape, so alpha is 0 until calibration fits it from runs of models
    # of different widths ("gemm_shape@DEVICE/PREC", a value, not a multiplier). Either sign happens:
    # big matrices fall out of cache (alpha > 0), small ones carry relatively more of the per-token
    # work the matmul FLOPs leave out (norms, RoPE, softmax, activations: alpha < 0).
    gemm_shape: dict[str, float] = field(default_factory=lambda: _by_kind(cpu=0.0, cuda=0.0, mps=0.0, xpu=0.0))
    # Seconds per op (a kernel launch on GPUs, a dispatch on CPUs) when not measured.
    op_overhead: dict[str, float] = field(default_factory=lambda: _by_kind(cpu=2e-6, cuda=8e-6, mps=15e-6, xpu=10e-6))
    # Fallbacks when the spec has no figure at all (an inventory before profiling).
    default_bandwidth: dict[str, float] = field(default_factory=lambda: _by_kind(cpu=30e9, cuda=500e9, mps=100e9, xpu=200e9))
    default_flops: dict[str, float] = field(default_factory=lambda: _by_kind(cpu=200e9, cuda=20e12, mps=5e12, xpu=10e12))
    disk_eff: float = 0.85            # O_DIRECT sequential read vs the datasheet figure
    default_disk_bandwidth: float = 500e6
    disk_latency_s: float = 100e-6    # one small random O_DIRECT read (embedding rows)
    link_eff: float = 0.8             # pinned host->device copies vs the link's nominal rate
    overlap: float = 1.0              # 1: transfer hides behind compute (max); 0: serial (sum)
    prefetch_depth: int = 2           # streamed units held at once per pool (one computing, one loading)
    ops_layer: int = 14               # norm, q/k/v/o, rope, attention, residual, norm, gate/up/act/down, residual
    ops_embed: int = 1
    ops_experts: int = 12             # sort/count + k x (gather, gate/up, act, down, scatter) at k=2..8
    ops_head: int = 3                 # norm, projection, sampling
    prefill_chunk: int = 512          # tokens per prefill pass (runtime.generate): weights dequantise once a pass
    act_bytes: int = 4                # hidden states cross device boundaries in fp32

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DeviceRates:
    """The effective rates of one compute device, per precision where they depend on it."""
    name: str
    kind: str
    gemm: dict[str, float]       # FLOP/s on prefill-shaped matmuls
    gemv: dict[str, float]       # weight bytes/s streamed by decode-shaped (M=B) matmuls
    mem: float                   # bytes/s reading the KV cache and activations
    overhead: float              # seconds per op
    overhead_scale: dict[str, float] = field(default_factory=dict)  # precision -> fitted factor (calibration)
    gemm_shape: dict[str, float] = field(default_factory=dict)  # precision -> alpha of the prefill rate's
                                                                # matrix-size term (Coefficients.gemm_shape)
    gemm_ref: float = 2048.0 * 2048.0  # weight elements of the matrix `gemm` was measured on
    # precision -> weight elements/s of the prefill's dequantise-to-bf16 pass (int4 and the GGUF block
    # formats, whose `gemm` is then the bf16 GEMM after it): a cost per pass, not per token, so a
    # short prompt pays relatively more of it (see dequant_rates)
    dequant: dict[str, float] = field(default_factory=dict)
    # FLOP/s of the prefill's attention (QK^T, softmax, AV over [heads, P, P]: eager torch, far below
    # the weight GEMMs' rate) once calibration has fitted "attn_rate@DEVICE"; 0: the unit's GEMM rate
    attn: float = 0.0
    # precision -> FLOP/s of a batched decode step's rows (the small-M row kernels, Profile gemm_rows):
    # the compute each sequence adds to a step whose weights are read once
    rows: dict[str, float] = field(default_factory=dict)
    # bytes/s (read + written) of an eager elementwise op whose output is a fresh buffer: the profile's
    # eager_bandwidth, else mem x Coefficients.eager_eff (what a training step's many small ops run at)
    eager: float = 0.0

    @property
    def precisions(self) -> tuple[str, ...]:
        """What the planner may choose here; `native` wherever some block format has rates (a unit
        at `native` is priced at its own formats' rates: rate_precision)."""
        have = [p for p in PRECISIONS if p in self.gemv and p in self.gemm]
        if NATIVE not in have and any(p in BLOCK_PRECISIONS for p in have):
            have.append(NATIVE)
        return tuple(have)

    def rate_precision(self, spec: ModelSpec, unit: str, precision: str) -> str:
        """The precision whose rates price `unit` at `precision`: a native unit runs its main format;
        a block format without rates of its own takes the nearest measured block format's."""
        p = spec.native_format(unit) if precision == NATIVE else precision
        if p in self.gemv and p in self.gemm:
            return p
        blocks = [b for b in BLOCK_PRECISIONS if b in self.gemv and b in self.gemm]
        if p in BLOCK_PRECISIONS and blocks:
            return min(blocks, key=lambda b: abs(BLOCK_PRECISIONS.index(b) - BLOCK_PRECISIONS.index(p)))
        return p if p in self.gemv else next(iter(self.gemv))


@dataclass(frozen=True)
class Link:
    """A path between two devices: one or more hops, each (bytes/s, latency s)."""
    hops: tuple[tuple[float, float], ...]

    def time(self, nbytes: float) -> float:
        if not self.hops or nbytes <= 0:
            return 0.0
        return sum(nbytes / bw + lat for bw, lat in self.hops)


# ---- calibration ---------------------------------------------------------------------------------

def calibrated(cal: dict[str, float], name: str, device: str = "", precision: str = "") -> float:
    """The product of fitted multipliers for one rate: keys "NAME", "NAME@DEVICE", "NAME@DEVICE/PREC".

    NAME is one of gemm_rate, gemv_rate, row_rate, dequant_rate, attn_rate, mem_rate, eager_rate, op_overhead,
    disk_rate, link_rate
    (gemm_shape@DEVICE/PREC and overlap are values, not multipliers: see device_rates, overlap_of)
    ("op_overhead@DEVICE/PREC" is read per precision, see device_rates). A multiplier
    > 1 means the thing measured faster (rates) or costlier (op_overhead) than predicted.
    """
    m = cal.get(name, 1.0)
    if device:
        m *= cal.get(f"{name}@{device}", 1.0)
        if precision:
            m *= cal.get(f"{name}@{device}/{precision}", 1.0)
    return m


def overlap_of(profile: Profile | None, coeffs: Coefficients) -> float:
    cal = profile.calibration if profile else {}
    return min(1.0, max(0.0, cal.get("overlap", coeffs.overlap)))


# ---- rates ---------------------------------------------------------------------------------------

def _device_precisions(dev: DeviceSpec, measured: set[str]) -> tuple[str, ...]:
    """Precisions a device has kernels for: what was measured, else what its kind supports."""
    if measured:
        return tuple(p for p in PRECISIONS if p in measured)
    if dev.kind == "cpu":  # fp16 matmuls on CPU are slow: never planned
        return ("fp32", "bf16", "int8", "int4", *BLOCK_PRECISIONS)
    if dev.kind == "cuda":
        peak = dev.peak_flops
        return tuple(p for p in PRECISIONS
                     if p in ("fp32", "fp16", "int8", "int4") or (p == "bf16" and (peak.get("bf16", 0) > 0 or not peak)))
    return ("fp32", "fp16", "bf16") if dev.kind == "mps" else ("fp32", "bf16", "fp16")


def device_rates(hw: HardwareSpec, profile: Profile | None, coeffs: Coefficients | None = None
                 ) -> dict[str, DeviceRates]:
    """Effective rates of every compute device: measured Profile figures first, else spec x efficiency."""
    coeffs = coeffs or Coefficients()
    cal = profile.calibration if profile else {}
    out: dict[str, DeviceRates] = {}
    for dev in hw.compute_devices():
        dp = profile.devices.get(dev.name) if profile else None
        m_gemm = {p: m.median for p, m in (dp.gemm_flops if dp else {}).items() if m.median > 0}
        m_gemv = {p: m.median for p, m in (dp.gemv_bandwidth if dp else {}).items() if m.median > 0}
        m_rows = {p: m.median for p, m in (getattr(dp, "gemm_rows", None) or {}).items() if m.median > 0}
        precs = _device_precisions(dev, set(m_gemv) | set(m_gemm))
        kind = dev.kind if dev.kind in coeffs.gemm_eff else "cpu"
        bw = dev.bandwidth or coeffs.default_bandwidth.get(kind, 30e9)
        peak_bf16 = dev.peak_flops.get("bf16") or dev.peak_flops.get("fp16") or coeffs.default_flops[kind]
        gemm, gemv, op_scale, shape, rows = {}, {}, {}, {}, {}
        deq = dequant_rates(m_gemm, *_probe_shape(profile)) if m_gemm else {}
        for p in precs:
            if p in m_gemm:
                g = m_gemm[p]
            elif m_gemm:  # measured some precisions: scale the nearest measured one
                base = m_gemm.get("bf16") or statistics.median(m_gemm.values())
                g = base * coeffs.quant_gemm.get(p, 1.0)
            else:
                peak = dev.peak_flops.get(p) or peak_bf16
                if p in coeffs.quant_gemm:  # weight-only: the matmul itself runs at bf16 rate
                    peak = peak_bf16 * coeffs.quant_gemm.get(p, 1.0)
                g = peak * coeffs.gemm_eff[kind]
            # decode streams weight bytes at a rate nearly independent of dtype (measured here)
            v = m_gemv.get(p) or (statistics.median(m_gemv.values()) if m_gemv else bw * coeffs.gemv_eff[kind])
            if p in deq:  # the probe's time less its dequantise pass: the bf16 GEMM after it
                g = m_gemm["bf16"]
                deq[p] *= calibrated(cal, "dequant_rate", dev.name, p)
            gemm[p] = g * calibrated(cal, "gemm_rate", dev.name, p)
            gemv[p] = v * calibrated(cal, "gemv_rate", dev.name, p)
            # measured where the profile has it; else the nearest measured precision's, else the sheet's
            r = m_rows.get(p) or (statistics.median(m_rows.values()) if m_rows else
                                  gemm[p] * coeffs.rows_eff.get(kind, 0.03))
            rows[p] = r * calibrated(cal, "row_rate", dev.name, p)
            shape[p] = cal.get(f"gemm_shape@{dev.name}/{p}", cal.get(f"gemm_shape@{dev.name}",
                                                                   coeffs.gemm_shape.get(kind, 0.0)))
            # quantised kernels carry their own per-call cost: "op_overhead@DEVICE/PREC" scales it
            if f"op_overhead@{dev.name}/{p}" in cal:
                op_scale[p] = cal[f"op_overhead@{dev.name}/{p}"]
        mem = _measured_mem(dp) or bw * coeffs.mem_eff[kind]
        # the prefill attention's rate: the measured bf16 GEMM's (it runs in bf16) times its own multiplier
        attn = 0.0
        if any(k in cal for k in ("attn_rate", f"attn_rate@{dev.name}")):
            attn = (m_gemm.get("bf16") or peak_bf16 * coeffs.gemm_eff[kind]) * calibrated(cal, "attn_rate", dev.name)
        over = dp.op_overhead.median if dp and dp.op_overhead else coeffs.op_overhead[kind]
        m_eager = getattr(dp, "eager_bandwidth", None) if dp else None
        eager = (m_eager.median if m_eager and m_eager.median > 0 else mem * coeffs.eager_eff[kind]) \
            * calibrated(cal, "eager_rate", dev.name)
        out[dev.name] = DeviceRates(dev.name, dev.kind, gemm, gemv,
                                    mem * calibrated(cal, "mem_rate", dev.name),
                                    over * calibrated(cal, "op_overhead", dev.name), op_scale,
                                    shape,
                                    _probe_elements(profile) if m_gemm else 2048.0 * 2048.0, deq, attn, rows, eager)
    return out


DEQUANT_PRECISIONS: tuple[str, ...] = ("int4", *BLOCK_PRECISIONS)  # prefill dequantises, then bf16 GEMM


def dequant_rates(m_gemm: dict[str, float], m: int, elements: float) -> dict[str, float]:
    """Weight elements/s of each dequantising precision's prefill pass, from the GEMM probe: its time
    at `m` tokens over `elements` weights is the bf16 GEMM's plus one dequantise pass, so the pass
    takes elements / (time_p - time_bf16). A precision measured at or above bf16's rate has no row."""
    b = m_gemm.get("bf16", 0.0)
    out = {}
    for p in DEQUANT_PRECISIONS:
        g = m_gemm.get(p, 0.0)
        if b > 0 and 0 < g < b:
            work = 2.0 * m * elements
            out[p] = elements / (work / g - work / b)
    return out


def _probe_elements(profile: Profile | None) -> float:
    """Weight elements (K x N) of the profile's GEMM probe (hetero.hardware.bench sizes)."""
    return _probe_shape(profile)[1]


def _probe_shape(profile: Profile | None) -> tuple[int, float]:
    """(tokens M, weight elements K x N) of the profile's GEMM probe (hetero.hardware.bench sizes)."""
    from hetero.hardware.bench import FULL, QUICK

    sz = FULL if profile is not None and profile.mode == "full" else QUICK
    return sz.gemm_m, float(sz.gemm_k * sz.gemm_n)


def _measured_mem(dp) -> float:
    if dp is None:
        return 0.0
    read = getattr(dp, "mem_read_bandwidth", None)
    if read is not None and read.median > 0:
        return read.median
    # a copy reads and writes: counted both ways it is about the read-only streaming rate
    return dp.mem_bandwidth.median if dp.mem_bandwidth else 0.0


def disk_device(hw: HardwareSpec) -> DeviceSpec | None:
    return next((d for d in hw.devices if d.kind == "disk"), None)


def disk_rate(hw: HardwareSpec, profile: Profile | None, coeffs: Coefficients | None = None) -> float:
    """O_DIRECT sequential read bytes/s: measured, else the datasheet figure x disk_eff."""
    coeffs = coeffs or Coefficients()
    cal = profile.calibration if profile else {}
    if profile and profile.disk_direct and profile.disk_direct.median > 0:
        r = profile.disk_direct.median
    else:
        d = disk_device(hw)
        r = d.bandwidth * coeffs.disk_eff if d and d.bandwidth else coeffs.default_disk_bandwidth
    return r * calibrated(cal, "disk_rate")


def link(hw: HardwareSpec, profile: Profile | None, src: str, dst: str,
         coeffs: Coefficients | None = None) -> Link:
    """The path for bytes from `src` to `dst` (compute devices); GPU<->GPU without a link goes via cpu."""
    coeffs = coeffs or Coefficients()
    if src == dst:
        return Link(())
    cal = profile.calibration if profile else {}
    ln = hw.link(src, dst)
    if ln is not None:
        gpu = dst if src == "cpu" else src if dst == "cpu" else ""
        dp = profile.devices.get(gpu) if profile and gpu else None
        if dp is not None and dp.h2d_pinned and dp.h2d_pinned.median > 0:
            bw = dp.h2d_pinned.median
        else:
            bw = ln.bandwidth * coeffs.link_eff if ln.bandwidth > 0 else 10e9
        return Link(((bw * calibrated(cal, "link_rate", f"{src}>{dst}"), ln.latency_s),))
    if "cpu" not in (src, dst):
        return Link(link(hw, profile, src, "cpu", coeffs).hops + link(hw, profile, "cpu", dst, coeffs).hops)
    return Link(((10e9 * calibrated(cal, "link_rate"), 10e-6),))  # no link recorded: a plain PCIe guess


# ---- per-unit bytes ------------------------------------------------------------------------------

def unit_bytes_table(spec: ModelSpec, precisions) -> dict[tuple[str, str], int]:
    """spec.unit_bytes for every (unit, precision), in one pass over the tensors (a 70B spec has ~700)."""
    from hetero.dtypes import weight_bytes

    by_unit: dict[str, list] = {u: [] for u in spec.unit_names()}
    for t in spec.tensors:
        by_unit.setdefault(spec.unit_of(t.name), []).append(t)
    if spec.tie_embeddings:  # a tied head reads the embedding matrix (as spec.unit_tensors says)
        by_unit["head"] += [t for t in spec.tensors if t.name == "model.embed_tokens.weight"]
    return {(u, p): sum(weight_bytes(p, t.shape, stored=t.dtype) for t in ts)
            for u, ts in by_unit.items() for p in precisions}


def read_bytes(spec: ModelSpec, unit: str, full: int, tokens: int) -> float:
    """Weight bytes one pass over `tokens` tokens reads (`full`: the unit's bytes at its precision).
    The embedding reads only the rows it looks up; a MoE layer only the experts its tokens are routed to."""
    if unit == "embed":
        return min(full, tokens * full / max(1, spec.vocab_size))
    frac = spec.unit_expert_fraction(unit)
    if frac:  # a MoE layer: its dense part, and the routed experts the tokens touch (k of E for one)
        return full * (1.0 - frac + frac * spec.experts_touched(tokens) / spec.n_experts)
    return full


def kv_bytes(spec: ModelSpec, unit: str, precision: str, context: int, batch: int, kv_dtype: str = "auto") -> int:
    """KV cache of one decoder layer for `batch` sequences of `context` tokens (on its compute device),
    stored as `kv_dtype` (int8: about half of bf16)."""
    if not unit.startswith("layers.") or spec.is_experts_unit(unit):
        return 0
    held = spec.layer_kv_tokens(spec.layer_index(unit), context)  # a local layer keeps its window only
    return batch * held * spec.kv_bytes_per_token(precision, layers=1, kv_dtype=kv_dtype)


def buffer_bytes(spec: ModelSpec, unit: str, full: int, prompt_tokens: int, batch: int,
                 coeffs: Coefficients) -> int:
    """Room one streamed unit takes in a prefetch pool: depth x what one pass reads. Routed experts
    streamed from disk go through the expert cache (runtime/experts.py), one expert at a time: its
    least room is depth x k experts (one token's working set in a layer)."""
    if spec.is_experts_unit(unit):
        return int(coeffs.prefetch_depth * expert_cache_min(spec) * full / max(1, spec.n_experts))
    return int(coeffs.prefetch_depth * read_bytes(spec, unit, full, batch * max(1, prompt_tokens)))


def workspace_bytes(spec: ModelSpec, prompt_tokens: int, batch: int, dequant: bool = False, ragged: int = 0) -> int:
    """Activation workspace of a device that runs any unit: the prefill of the whole prompt at once
    (`ragged` > 0: a batch runner's step instead, up to `ragged` prompt tokens of one prompt after
    another, beside the batch's decode rows).

    hidden/residual/normed [B, P, h] x3, q [B, P, H*D], k/v [B, P, kv] x2, gate/up [B, P, f] x2 (fp32),
    attention scores [B, H, P, P] (eager attention), last-token logits [B, vocab]; with `dequant`
    (a CPU that may run int4) also the block an int4 prefill dequantises at a time (at most ~6 MB).
    """
    h, f, kv = spec.hidden_size, spec.intermediate_size, spec.kv_dim
    q = spec.n_heads * spec.head_dim
    tok = batch * max(1, prompt_tokens)
    per_tok = 3 * h + q + 2 * kv + 2 * f
    scores = batch * spec.n_heads * prompt_tokens * prompt_tokens
    if ragged:  # a batch runner's step: at most `ragged` prompt tokens, each prompt attending alone
        tok = min(tok, ragged) + batch
        scores = spec.n_heads * min(prompt_tokens, ragged) * prompt_tokens
    block = min(DEQUANT_ELEMENTS, max(2 * f * h, (q + 2 * kv) * h, spec.vocab_size * h)) if dequant else 0
    return 4 * (tok * per_tok + scores + batch * spec.vocab_size) + DEQUANT_BYTES_PER_ELEMENT * block


# ---- per-unit times ------------------------------------------------------------------------------

def expert_cache_min(spec: ModelSpec) -> int:
    """Experts the expert cache holds at least, per prefetch slot: one token's k."""
    return max(1, spec.experts_per_token)


def unit_ops(unit: str, coeffs: Coefficients) -> int:
    if unit == "embed":
        return coeffs.ops_embed
    if unit.endswith(".experts"):  # routing bookkeeping, then gate/up, act, down, scatter per expert
        return coeffs.ops_experts
    return coeffs.ops_head if unit == "head" else coeffs.ops_layer


def unit_matrices(spec: ModelSpec, unit: str) -> list[int]:
    """Weight elements of each matrix a unit multiplies by, as the runtime runs them (q/k/v fused,
    gate/up fused)."""
    h = spec.hidden_size
    if unit == "head":
        return [spec.vocab_size * h]
    if not unit.startswith("layers."):
        return []
    q = spec.n_heads * spec.head_dim
    f = spec.intermediate_size
    if spec.is_experts_unit(unit):  # each expert's fused gate/up and its down
        return [2 * f * h, f * h]
    if spec.is_moe:
        fs = spec.shared_expert_ffn
        return [(q + 2 * spec.kv_dim) * h, h * q, *([2 * fs * h, fs * h] if fs else [])]
    return [(q + 2 * spec.kv_dim) * h, h * q, 2 * f * h, f * h]


def gemm_shape_factor(spec: ModelSpec, unit: str, ref_elements: float, alpha: float) -> float:
    """A unit's prefill GEMM rate relative to the probe's: each matrix m runs at
    rate x (elements_m / ref)^-alpha, so over the unit's FLOPs (each m's ∝ elements_m)
    the effective factor is sum(e) / sum(e x (e / ref)^alpha)."""
    mats = unit_matrices(spec, unit)
    if not mats or alpha == 0.0:
        return 1.0
    return sum(mats) / sum(e * (e / ref_elements) ** alpha for e in mats)


def compute_time(spec: ModelSpec, unit: str, rates: DeviceRates, precision: str, full: int, tokens: int,
                 context: int, batch: int, coeffs: Coefficients) -> float:
    """Seconds for one pass of `tokens` tokens per sequence attending to `context` (roofline + overhead).

    Decode: tokens=1, context=C. Prefill of P tokens: tokens=P, context=P (the average token sees P/2;
    unit_flops_per_token takes the attended length).
    """
    t = compute_terms(spec, unit, rates, precision, full, tokens, context, batch, coeffs)
    return max(t["gemm"], t["memory"]) + t["attention"] + t["dequant"] + t["overhead"]


def compute_terms(spec: ModelSpec, unit: str, rates: DeviceRates, precision: str, full: int, tokens: int,
                  context: int, batch: int, coeffs: Coefficients) -> dict[str, float]:
    """compute_time's terms in seconds: gemm (matmul FLOPs), memory (weight and KV bytes; the roofline
    takes the larger of the two), attention (prefill, once calibrated), dequant (prefill passes of
    dequantising formats) and overhead (per-op cost)."""
    avg_ctx = context if tokens == 1 else max(1, context // 2)
    flops = batch * tokens * spec.unit_flops_per_token(unit, avg_ctx)
    weights = read_bytes(spec, unit, full, batch * tokens)
    # decode reads the whole KV cache; prefill writes its new K/V once
    kv = kv_bytes(spec, unit, precision, context if tokens == 1 else tokens, batch)
    precision = rates.rate_precision(spec, unit, precision)
    rate = rates.gemm[precision]
    if tokens == 1 and 1 < batch <= coeffs.rows_max and rates.rows.get(precision):
        # a batched decode step: B rows through the small-M row kernels, the weight read once for all
        # (the memory term), each row's arithmetic at the measured row rate (the roofline's other side)
        rate = rates.rows[precision]
    if tokens > 1 and rates.gemm_shape.get(precision):
        rate *= gemm_shape_factor(spec, unit, rates.gemm_ref, rates.gemm_shape[precision])
    attn = 0.0
    if tokens > 1 and rates.attn > 0:  # the prompt's attention at its own rate, after the weight GEMMs
        attn = batch * tokens * (spec.unit_flops_per_token(unit, avg_ctx) - spec.unit_flops_per_token(unit, 0))
        flops -= attn
    deq = 0.0
    if tokens > 1 and precision in rates.dequant:  # each prefill pass dequantises the unit's matrices once
        passes = -(-tokens // coeffs.prefill_chunk)
        deq = passes * sum(unit_matrices(spec, unit)) / rates.dequant[precision]
    return {"gemm": flops / rate, "memory": weights / rates.gemv[precision] + kv / rates.mem,
            "attention": attn / rates.attn if attn else 0.0, "dequant": deq,
            "overhead": unit_ops(unit, coeffs) * rates.overhead * rates.overhead_scale.get(precision, 1.0)}


def transfer_time(spec: ModelSpec, unit: str, full: int, residency: str, device: str, tokens: int,
                  batch: int, disk_bw: float, host_link: Link, coeffs: Coefficients) -> float:
    """Seconds to bring a streamed unit's weights to its compute device for one pass (0 if resident).

    Disk reads and the host->GPU copy run as a pipeline of chunks, so the slower stage sets the time.
    """
    if residency == "resident":
        return 0.0
    nbytes = read_bytes(spec, unit, full, batch * tokens)
    if residency == "ram":
        return host_link.time(nbytes)
    if unit == "embed":  # rows read one by one, or the whole matrix when that is cheaper
        rows = batch * tokens
        disk = min(rows * (full / max(1, spec.vocab_size) / disk_bw + coeffs.disk_latency_s), full / disk_bw)
    else:
        disk = nbytes / disk_bw
    return max(disk, host_link.time(nbytes)) if device != "cpu" else disk


def overlapped(compute: float, transfer: float, prefetch: bool, overlap: float) -> float:
    """A streamed unit with prefetch hides the shorter of compute and transfer behind the longer."""
    if not prefetch:
        return compute + transfer
    return max(compute, transfer) + (1.0 - overlap) * min(compute, transfer)


def activation_bytes(spec: ModelSpec, tokens: int, batch: int, coeffs: Coefficients) -> int:
    """Hidden states that cross a device boundary in one pass: [B, T, h]."""
    return batch * tokens * spec.hidden_size * coeffs.act_bytes
