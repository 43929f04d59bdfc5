"""Plan: the one thing that passes from planning to execution — plain, versioned, hand-editable data.

JSON layout (version 1):

    {"version": 1, "kind": "hetero",
     "model": {"name": ..., "fingerprint": ...},
     "hardware": {"host": ..., "source": "this" | "catalog:..." | path},
     "workload": {"objective": "decode", "prompt_tokens": 512, "context": 640, "batch": 1,
                  "kv_dtype": "auto"},
     "budgets": {"cpu": bytes, "disk": bytes, ...},  "reserve": {"cpu": bytes},
     "precisions": [...], "max_quality_loss": null, "prefetch": true, "prefetch_depth": 2,
     "units": [{"name": "layers.0", "device": "cpu", "precision": "int8", "residency": "resident",
                "bytes": ..., "predicted_ms": ..., "prefill_ms": ...}, ...],
     "memory": {"cpu": bytes, ...},
     "memory_breakdown": {"cpu": {"weights": .., "kv": .., "buffers": .., "workspace": ..}},
     "predicted": {"prefill_tok_s": .., "decode_tok_s": .., "ttft_s": .., "decode_ms": ..,
                   "prefill_ms": .., "throughput_tok_s": .., "quality_loss": ..},
     "stages": [], "why": {...}, "solver": {...}}

`units[].predicted_ms` is the unit's share of one decode step (streaming included); `prefill_ms` its
share of the prefill. `stages` (contiguous pipeline stages, one rank each: host, first, last, rank,
device, and the rank's budgets / reserve / memory) is empty for a single-process plan; a pipeline's
`budgets` and `memory` are then the ranks' sums, and each rank runs `plan.stage_plan(rank)`. Editing a plan by hand and running `hetero.plan.rescore` prices it again.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hetero.cost import RESIDENCIES
from hetero.dtypes import KV_DTYPES, PRECISIONS
from hetero.errors import HeteroError

PLAN_VERSION = 1


@dataclass(frozen=True)
class UnitPlan:
    name: str                 # embed | layers.i | head
    device: str               # compute device: cpu | cuda:0 | mps ...
    precision: str            # fp32 | bf16 | fp16 | int8 | int4
    residency: str            # resident | ram (streamed RAM -> GPU) | disk (streamed with O_DIRECT)
    bytes: int                # weight bytes at `precision`
    predicted_ms: float = 0.0  # share of one decode step
    prefill_ms: float = 0.0    # share of the prefill


@dataclass(frozen=True)
class Stage:
    """A contiguous run of units on one rank, a pipeline stage (executed over torch.distributed), with
    that rank's own budgets, reserve and planned memory: each rank is one process, budgeted alone."""
    host: str
    first: str                # first unit name
    last: str                 # last unit name (inclusive)
    rank: int = 0
    device: str = ""          # the rank's compute device (the split's choice)
    budgets: dict[str, int] = field(default_factory=dict)
    reserve: dict[str, int] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)
    decode_ms: float = 0.0    # this stage's share of one decode step (its units)
    prefill_ms: float = 0.0
    send_ms: float = 0.0      # its activations to the next rank (the last: token ids back to rank 0)


@dataclass(frozen=True)
class Prediction:
    prefill_tok_s: float
    decode_tok_s: float
    ttft_s: float
    decode_ms: float
    prefill_ms: float
    throughput_tok_s: float
    quality_loss: float = 0.0


@dataclass(frozen=True)
class BatchOption:
    """One batch size the planner priced (plan/batch.py): its best placement's step and rates."""
    batch: int
    fits: bool
    decode_tok_s: float = 0.0       # aggregate: batch tokens per decode step
    decode_ms: float = 0.0          # one step of every sequence (each sequence's time per token)
    throughput_tok_s: float = 0.0   # with the prefill of every prompt (objective "throughput")
    note: str = ""                  # why it was not chosen, when it fits but loses


@dataclass(frozen=True)
class Why:
    """The explanation: what binds, and what the next-best alternative would cost."""
    binding: tuple[str, ...] = ()
    alternative: str = ""
    alternative_decode_tok_s: float = 0.0
    alternative_objective_ms: float = 0.0
    notes: tuple[str, ...] = ()
    alternatives: tuple[str, ...] = ()   # the best plan without each device / precision this one uses


@dataclass(frozen=True)
class Plan:
    model: str
    fingerprint: str
    host: str
    hardware: str
    objective: str
    prompt_tokens: int
    context: int
    batch: int
    budgets: dict[str, int]
    units: tuple[UnitPlan, ...]
    memory: dict[str, int]
    predicted: Prediction
    memory_breakdown: dict[str, dict[str, int]] = field(default_factory=dict)
    reserve: dict[str, int] = field(default_factory=dict)
    precisions: tuple[str, ...] = ()
    max_quality_loss: float | None = None
    prefetch: bool = True
    prefetch_depth: int = 2
    stages: tuple[Stage, ...] = ()
    kind: str = "hetero"      # hetero, or the baseline it came from
    why: Why = field(default_factory=Why)
    solver: dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION
    kv_dtype: str = "auto"    # how the KV cache is stored (dtypes.KV_DTYPES); priced in `memory`
    ragged: bool = False      # the batch runs in a batch runner (runtime/batch.py; priced per step)
    batch_options: tuple[BatchOption, ...] = ()  # the sizes the planner chose `batch` among
    max_latency_ms: float | None = None          # the bound on a step (time per token) it chose under

    # ---- queries ---------------------------------------------------------------------------------
    def unit(self, name: str) -> UnitPlan:
        for u in self.units:
            if u.name == name:
                return u
        raise KeyError(name)

    def devices(self) -> list[str]:
        return list(dict.fromkeys(u.device for u in self.units))

    def stage_units(self, rank: int) -> tuple[UnitPlan, ...]:
        """The units of the stage run by `rank`."""
        st = self.stage(rank)
        names = [u.name for u in self.units]
        return self.units[names.index(st.first):names.index(st.last) + 1]

    def stage(self, rank: int) -> Stage:
        for s in self.stages:
            if s.rank == rank:
                return s
        raise HeteroError(f"the plan has no stage for rank {rank} (it has {len(self.stages)} stages)")

    def stage_plan(self, rank: int) -> "Plan":
        """What one rank executes: its units, with its own budgets, reserve and planned memory."""
        st = self.stage(rank)
        units = self.stage_units(rank)
        dec, pre = st.decode_ms or 1e-9, st.prefill_ms or 1e-9
        pred = Prediction(self.batch * self.prompt_tokens * 1e3 / pre, self.batch * 1e3 / dec, pre / 1e3,
                          dec, pre, self.predicted.throughput_tok_s, 0.0)
        return dataclasses.replace(self, units=units, budgets=dict(st.budgets), reserve=dict(st.reserve),
                                   memory=dict(st.memory), memory_breakdown={}, predicted=pred, stages=(st,))

    def kv_capacity(self) -> dict[str, int] | None:
        """The KV cache this plan holds and what its budget would hold at this placement:
        {"bytes", "per_token" (one sequence, every layer), "max_context" (tokens per sequence with
        `batch` sequences), "max_batch" (sequences at `context`)}; None without KV in memory.
        Every layer is priced as keeping every token (a local layer's window makes it an under-estimate)."""
        kv = {d: b.get("kv", 0) for d, b in self.memory_breakdown.items() if b.get("kv", 0)}
        if not kv or len(self.stages) > 1:
            return None
        total = sum(kv.values())
        per_token = max(1, total // (self.batch * self.context))
        # the device the KV lives on: its headroom bounds the cache (one device holds it in practice)
        dev = max(kv, key=kv.get)
        budget = self.budgets.get(dev)
        if budget is None:
            return {"bytes": total, "per_token": per_token, "max_context": 0, "max_batch": 0}
        room = budget - self.reserve.get(dev, 0) - self.memory.get(dev, 0) + kv[dev]  # all of it for KV
        share = kv[dev] / total
        cap = int(room / share) if share else 0
        return {"bytes": total, "per_token": per_token, "max_context": cap // (per_token * self.batch),
                "max_batch": cap // (per_token * self.context)}

    def over_budget(self) -> dict[str, int]:
        """Devices whose planned use plus the runtime's reserve exceeds the budget, by how many bytes
        (a pipeline: each rank against its own budget)."""
        if len(self.stages) > 1:
            return {f"rank {s.rank} {d}": n for s in self.stages for d, n in self.stage_plan(s.rank).over_budget().items()}
        out = {}
        for d, b in self.budgets.items():
            need = self.memory.get(d, 0) + self.reserve.get(d, 0)
            if need > b:
                out[d] = need - b
        return out

    def explain(self, compare: list["Plan"] | None = None):
        """A rich renderable: the unit table, totals and why (see hetero.plan.explain)."""
        from hetero.plan.explain import explain

        return explain(self, compare)

    # ---- JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {
            "version": self.version, "kind": self.kind,
            "model": {"name": self.model, "fingerprint": self.fingerprint},
            "hardware": {"host": self.host, "source": self.hardware},
            "workload": {"objective": self.objective, "prompt_tokens": self.prompt_tokens,
                         "context": self.context, "batch": self.batch, "kv_dtype": self.kv_dtype,
                         "ragged": self.ragged, "max_latency_ms": self.max_latency_ms,
                         "batch_options": [dataclasses.asdict(o) for o in self.batch_options]},
            "budgets": dict(self.budgets), "reserve": dict(self.reserve),
            "precisions": list(self.precisions), "max_quality_loss": self.max_quality_loss,
            "prefetch": self.prefetch, "prefetch_depth": self.prefetch_depth,
            "units": [dataclasses.asdict(u) for u in self.units],
            "memory": dict(self.memory), "memory_breakdown": self.memory_breakdown,
            "predicted": dataclasses.asdict(self.predicted),
            "stages": [dataclasses.asdict(s) for s in self.stages],
            "why": {**dataclasses.asdict(self.why), "binding": list(self.why.binding),
                    "notes": list(self.why.notes), "alternatives": list(self.why.alternatives)},
            "solver": self.solver,
        }
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> None:
        """Write to a temp file beside `path`, then rename; an unwritable path is one clear error."""
        import os
        import tempfile

        p = Path(path).expanduser()
        if p.is_dir():
            raise HeteroError(f"{p} is a directory; give a file name for the plan, e.g. {p / 'plan.json'}")
        if p.exists() and not p.is_file():  # renaming over /dev/null would replace the device itself
            raise HeteroError(f"{p} is not a regular file; give a file name for the plan")
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
        except OSError as e:
            raise HeteroError(f"cannot write the plan to {p}: {e.strerror or e}") from None
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.to_json() + "\n")
            os.replace(tmp, p)
        except OSError as e:
            Path(tmp).unlink(missing_ok=True)
            raise HeteroError(f"cannot write the plan to {p}: {e.strerror or e}") from None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        if not isinstance(d, dict):
            raise HeteroError(f"not a valid plan: a JSON object is needed, got {type(d).__name__}")
        try:
            v = int(d.get("version", 0))
            if v > PLAN_VERSION or v < 1:
                raise HeteroError(f"plan version {v} is not supported (this hetero reads version {PLAN_VERSION})")
            units = tuple(_unit(u) for u in d["units"])
            wl = d.get("workload", {})
            why = d.get("why") or {}
            plan = cls(
                model=d["model"]["name"], fingerprint=d["model"].get("fingerprint", ""),
                host=d.get("hardware", {}).get("host", ""), hardware=d.get("hardware", {}).get("source", ""),
                objective=wl.get("objective", "decode"), prompt_tokens=int(wl.get("prompt_tokens", 512)),
                context=int(wl.get("context", 640)), batch=int(wl.get("batch", 1)),
                budgets={k: int(v) for k, v in d.get("budgets", {}).items()},
                units=units,
                memory={k: int(v) for k, v in d.get("memory", {}).items()},
                predicted=Prediction(**d["predicted"]) if d.get("predicted") else Prediction(0, 0, 0, 0, 0, 0),
                memory_breakdown={k: dict(v) for k, v in d.get("memory_breakdown", {}).items()},
                reserve={k: int(v) for k, v in d.get("reserve", {}).items()},
                precisions=tuple(d.get("precisions", ())), max_quality_loss=d.get("max_quality_loss"),
                prefetch=bool(d.get("prefetch", True)), prefetch_depth=int(d.get("prefetch_depth", 2)),
                stages=tuple(_stage(s) for s in d.get("stages", ())),
                kind=d.get("kind", "hetero"),
                why=Why(binding=tuple(why.get("binding", ())), alternative=why.get("alternative", ""),
                        alternative_decode_tok_s=float(why.get("alternative_decode_tok_s", 0.0)),
                        alternative_objective_ms=float(why.get("alternative_objective_ms", 0.0)),
                        notes=tuple(why.get("notes", ())), alternatives=tuple(why.get("alternatives", ()))),
                solver=dict(d.get("solver", {})), version=v,
                kv_dtype=str(wl.get("kv_dtype", "auto")), ragged=bool(wl.get("ragged", False)),
                batch_options=tuple(_batch_option(o) for o in wl.get("batch_options", ())),
                max_latency_ms=None if wl.get("max_latency_ms") is None else float(wl["max_latency_ms"]),
            )
            _check_ranges(plan)
            return plan
        except HeteroError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise HeteroError(f"not a valid plan: {type(e).__name__}: {e}") from None

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            return cls.from_dict(json.loads(text))
        except ValueError as e:
            raise HeteroError(f"plan is not valid JSON: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        from hetero.paths import read_user_text

        try:
            return cls.from_json(read_user_text(path, "plan"))
        except RecursionError:
            raise HeteroError(f"plan {path} is not valid JSON (nested too deep)") from None


def _check_ranges(p: "Plan") -> None:
    """Numbers a hand-edited plan could get wrong: budgets and sizes are not negative, the
    workload is at least one token and one sequence."""
    for what, table in (("budget", p.budgets), ("reserve", p.reserve), ("memory", p.memory)):
        for dev, v in table.items():
            if v < 0:
                raise HeteroError(f"not a valid plan: {what} for {dev} is negative ({v})")
    for what, v in (("context", p.context), ("prompt_tokens", p.prompt_tokens), ("batch", p.batch),
                    ("prefetch_depth", p.prefetch_depth + 1)):
        if v < 1:
            raise HeteroError(f"not a valid plan: workload {what} must be at least 1 (got {v})")
    if p.max_quality_loss is not None and not (isinstance(p.max_quality_loss, (int, float))
                                               and p.max_quality_loss >= 0):
        raise HeteroError(f"not a valid plan: max_quality_loss {p.max_quality_loss!r} must be >= 0")
    if p.kv_dtype not in KV_DTYPES:
        raise HeteroError(f"not a valid plan: kv_dtype {p.kv_dtype!r} is not one of {', '.join(KV_DTYPES)}")
    for u in p.units:
        if u.bytes < 0:
            raise HeteroError(f"not a valid plan: unit {u.name} has negative bytes")


def _batch_option(o: dict[str, Any]) -> BatchOption:
    return BatchOption(batch=int(o["batch"]), fits=bool(o["fits"]), decode_tok_s=float(o.get("decode_tok_s", 0.0)),
                       decode_ms=float(o.get("decode_ms", 0.0)), throughput_tok_s=float(o.get("throughput_tok_s", 0.0)),
                       note=str(o.get("note", "")))


def _stage(s: dict[str, Any]) -> Stage:
    ints = {k: {d: int(v) for d, v in s.get(k, {}).items()} for k in ("budgets", "reserve", "memory")}
    return Stage(host=str(s["host"]), first=s["first"], last=s["last"], rank=int(s.get("rank", 0)),
                 device=str(s.get("device", "")), **ints, decode_ms=float(s.get("decode_ms", 0.0)),
                 prefill_ms=float(s.get("prefill_ms", 0.0)), send_ms=float(s.get("send_ms", 0.0)))


def _unit(u: dict[str, Any]) -> UnitPlan:
    up = UnitPlan(name=u["name"], device=u["device"], precision=u["precision"], residency=u["residency"],
                  bytes=int(u.get("bytes", 0)), predicted_ms=float(u.get("predicted_ms", 0.0)),
                  prefill_ms=float(u.get("prefill_ms", 0.0)))
    if u.get("host"):
        raise HeteroError(f"unit {up.name}: per-unit hosts are not part of a plan (pipeline ranks are its stages)")
    if up.residency not in RESIDENCIES:
        raise HeteroError(f"unit {up.name}: residency {up.residency!r} is not one of {', '.join(RESIDENCIES)}")
    if up.precision not in PRECISIONS:
        raise HeteroError(f"unit {up.name}: precision {up.precision!r} is not one of {', '.join(PRECISIONS)}")
    return up
