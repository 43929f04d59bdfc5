"""The executor: build a model exactly as a Plan says, run it, and measure it against the Plan.

    eng = Engine.load(plan, "synthetic:llama-1b")        # check, convert once, build
    rec = eng.generate(prompt, max_new_tokens=32)         # a Model.generate-like run
    eng.report()                                          # predicted vs measured, per device

Each unit runs on its device at its precision (the kernels of hetero.ops.linear); activations
move at device boundaries (Decoder.forward); the KV cache sits on each layer's device. Units
whose residency is "disk" are read with O_DIRECT by a prefetch thread from the tensor cache;
"ram" units on a GPU are copied from pinned host memory on a side stream. A plan with no streamed
unit is built straight from the weights, dropping their page-cache pages as it goes, so that the
footprint of every run is RSS + the model's cached file pages, inside the plan's budget.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from hetero.errors import HeteroError
from hetero.runtime.api import Model
from hetero.model.decoder import Decoder
from hetero.model.units import UnitConfig, final_norm, tie_embedding
from hetero.model.sources import Source, resolve, resolve_spec
from hetero.model.spec import ModelSpec
from hetero.model.weights import WeightStore, required
from hetero.plan.plan import Plan
from hetero.runtime import baseline, devices, memory
from hetero.runtime.stream import DiskEmbedding, HostBuffer, DirectReader, Prefetcher, StreamItem
from hetero.runtime.stream import StreamedUnit, bind
from hetero.runtime.tensorcache import Entry, Holder, cache_root, ensure_entries, missing_bytes

OVER_BUDGET = 1.05  # measured footprint above budget x this is reported as a broken budget
# Converting more than this runs in a child process: quantising a unit needs fp32 temporaries that
# would otherwise raise this process's peak footprint above a tight budget, for good.
ISOLATE_BYTES = 256 << 20


def _convert(model: str, units: dict[str, tuple[str, str]], root: str) -> None:
    """Write the missing tensor-cache entries of `units` (run in a child process by _convert_isolated)."""
    src, spec = resolve(model), resolve_spec(model)
    files = source_files(src)
    weights = _dropping(required(WeightStore(src, spec)), files)
    ensure_entries(spec, weights, units, Path(root), after_unit=lambda: [memory.drop_cache(f) for f in files])


def _convert_main() -> None:
    """Child entry point: JSON {model, units, root} on stdin; a HeteroError becomes `error: ...`, exit 2."""
    args = json.load(sys.stdin)
    try:
        _convert(args["model"], {u: tuple(v) for u, v in args["units"].items()}, args["root"])
    except HeteroError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _convert_isolated(model: str, units: dict[str, tuple[str, str]]) -> None:
    """Convert in a child process: its peak memory leaves with it, before this process loads anything."""
    import subprocess

    args = json.dumps({"model": model, "units": units, "root": str(cache_root())})
    code = "from hetero.runtime.engine import _convert_main; _convert_main()"
    r = subprocess.run([sys.executable, "-c", code], input=args, text=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)
    if r.returncode != 0:
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit status {r.returncode}"
        msg = last[len("error: "):] if last.startswith("error: ") else f"the converter process failed: {last}"
        raise HeteroError(msg)


def _tight(plan: Plan, spec: ModelSpec) -> bool:
    """Whether converting here could break the plan's cpu budget: its headroom is under the
    temporaries of converting the largest unit (~3x its fp32 size: dequantised weights, quantiser
    intermediates). Then conversion runs in a child, as a large one always does."""
    budget = plan.budgets.get("cpu")
    if not budget:
        return False
    headroom = budget - plan.memory.get("cpu", 0) - plan.reserve.get("cpu", 0)
    return headroom < 3 * max(spec.unit_bytes(u, "fp32") for u in spec.unit_names())


def source_files(src: Source) -> list[Path]:
    """The files a model's weights are read from (their page-cache pages count in the footprint)."""
    from hetero.model.hf import safetensors_files

    if src.kind == "gguf":
        return [src.path]
    if src.kind == "synthetic":
        from hetero.model.synthetic import ensure_weights

        return safetensors_files(ensure_weights(src.name))
    return safetensors_files(src.path)


def check_fits(plan: Plan, available: int | None = None) -> str | None:
    """Why the plan no longer fits this machine's free RAM now (None when it fits)."""
    import psutil

    need = plan.memory.get("cpu", 0)
    if available is None:
        # what this process already holds is the runtime's reserve, counted apart from `need`
        available = psutil.virtual_memory().available
    if need > available:
        from hetero.plan.units import fmt_bytes

        return (f"the plan needs {fmt_bytes(need)} of RAM beyond the runtime but only "
                f"{fmt_bytes(available)} is free now")
    return None


class Engine:
    """A built model plus its streaming machinery and footprint monitor."""

    def __init__(self, plan: Plan, model: Model, prefetchers: list[Prefetcher], embed: DiskEmbedding | None,
                 monitor: memory.Footprint, cache_bytes: int, build: dict):
        self.plan, self.model, self.prefetchers, self.disk_embed = plan, model, prefetchers, embed
        self.monitor, self.cache_bytes, self.build = monitor, cache_bytes, build
        self.last: dict = {}

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def load(cls, plan: Plan, model: str | None = None, prefetch: bool | None = None,
             hardware=None, progress: bool = True, monitor: memory.Footprint | None = None,
             use_cache: bool | None = None, stage: int | None = None, order: str = "forward") -> "Engine":
        """Check the plan against the model (and the machine when `hardware` is given), then build it.

        use_cache: load every unit from the tensor cache (the default); False builds the units straight
        from the weight files in this process, whose conversion temporaries then count in its peak.
        stage: a pipeline plan's rank; only that stage's units are converted and built, and the engine
        runs (and is measured against) `plan.stage_plan(stage)`, that rank's budgets.
        order: "forward" (every pass visits the streamed units in plan order) or "train" (a training
        step: forward, the head, then the layers again in reverse for backward; finetune/step.py).
        """
        from hetero.plan import check_plan

        t0 = time.perf_counter()
        src = resolve(model or plan.model)
        spec = resolve_spec(model or plan.model)
        check_plan(plan, spec, hardware)
        names = [u.name for u in plan.units]
        if names != spec.unit_names():
            raise HeteroError(f"the plan's units ({len(names)}) do not match {spec.name}'s "
                              f"({len(spec.unit_names())}): it was made for another model")
        if plan.stages and stage is None:
            raise HeteroError(f"this plan is a pipeline of {len(plan.stages)} stages: run it with `hetero pipeline`")
        if stage is not None:
            plan = plan.stage_plan(stage)
        stage_names = [u.name for u in plan.units] if stage is not None else None
        for u in plan.units:
            if u.device.startswith("cuda") and not torch.cuda.is_available():
                raise HeteroError(f"unit {u.name} is planned on {u.device} but CUDA is not available here")
        files = source_files(src)
        mon = monitor or memory.Footprint().start()
        store = WeightStore(src, spec)
        weights = _dropping(required(store), files)
        prefetch = plan.prefetch if prefetch is None else prefetch
        streamed = [u for u in plan.units if _streams(u)]
        prefetchers: list[Prefetcher] = []
        disk_embed = None
        cache_bytes = 0
        t_conv = 0.0
        if use_cache is None:
            # Always through the per-plan cache: conversion runs once (in a child process when big), and
            # resident units are read back into memory of their own, so loading never peaks over budget.
            use_cache = True
        if not use_cache:
            # built from the weight files: their cached pages are this run's until dropped below
            mon.files = list(dict.fromkeys([*mon.files, *files]))
            if streamed:
                raise HeteroError("a plan that streams units runs from the tensor cache (use_cache=True)")
            net = Decoder.build(spec, weights, unit_configs(plan), names=stage_names)
        else:
            t1 = time.perf_counter()
            want = {u.name: (u.device, u.precision) for u in plan.units}
            missing = missing_bytes(spec, want)
            if missing > ISOLATE_BYTES or (missing and _tight(plan, spec)):
                _convert_isolated(model or plan.model, want)
            entries = ensure_entries(spec, weights, want, after_unit=lambda: [memory.drop_cache(f) for f in files],
                                     progress=progress)
            t_conv = time.perf_counter() - t1
            # the run reads only the cache entries (O_DIRECT); the weight files are not touched again
            mon.files += [e.path for e in entries.values()]
            net, prefetchers, disk_embed = _assemble(spec, plan, entries, weights, prefetch, stage_names, order)
            cache_bytes = sum(entries[u.name].data_bytes for u in plan.units if u.residency == "disk")
        for f in files:
            memory.drop_cache(f)
        from hetero.model.tokenizer import load_tokenizer

        tok = load_tokenizer(src, spec.vocab_size, None)
        net.kv_dtype = plan.kv_dtype  # the KV storage the plan priced (int8: layer by layer, no compiled stack)
        m = Model(spec, net, tok, time.perf_counter() - t0)
        mon.sample()
        build = {"load_s": round(time.perf_counter() - t0, 3), "convert_s": round(t_conv, 3),
                 "prefetch": bool(prefetch), "streamed_units": len(streamed)}
        return cls(plan, m, prefetchers, disk_embed, mon, cache_bytes, build)

    # ---- running ---------------------------------------------------------------------------------
    def stream(self, prompt, **kwargs):
        """Model.stream under the plan; the last record's speeds are kept for report()."""
        for rec in self.model.stream(prompt, **kwargs):
            self.last = {"prefill_tok_s": rec.prefill_tok_s, "decode_tok_s": rec.decode_tok_s,
                         "prompt_tokens": rec.prompt_tokens, "generated_tokens": rec.generated_tokens}
            yield rec

    def generate(self, prompt, **kwargs) -> list[int]:
        ids = []
        for rec in self.stream(prompt, **kwargs):
            ids += rec.token_ids
        return ids

    def footprint(self) -> dict[str, int]:
        """Measured peak bytes per memory device: cpu (RSS + model file pages cached), cuda:N, disk."""
        self.monitor.sample()
        out = {"cpu": self.monitor.peak}
        for d in self.plan.devices():
            if d.startswith("cuda") and torch.cuda.is_available():
                out[d] = torch.cuda.max_memory_reserved(torch.device(d))
        if self.cache_bytes:
            out["disk"] = self.cache_bytes
        return out

    def predicted_footprint(self) -> dict[str, int]:
        p = self.plan
        return {d: p.memory.get(d, 0) + p.reserve.get(d, 0) for d in p.memory if p.memory.get(d, 0) or d in p.reserve}

    def over_budget(self) -> dict[str, tuple[int, int]]:
        """Devices whose measured peak broke the budget by more than 5%: device -> (measured, budget)."""
        out = {}
        for d, used in self.footprint().items():
            b = self.plan.budgets.get(d)
            if b and d != "disk" and used > b * OVER_BUDGET:
                out[d] = (used, b)
        return out

    def report(self) -> dict:
        """budget_bytes, predicted and measured (prefill/decode tok/s, footprint per device), streaming stats."""
        p = self.plan.predicted
        return {
            "budget_bytes": dict(self.plan.budgets),
            "predicted": {"prefill_tok_s": round(p.prefill_tok_s, 2), "decode_tok_s": round(p.decode_tok_s, 2),
                          "footprint_bytes": self.predicted_footprint()},
            "measured": {"prefill_tok_s": round(self.last.get("prefill_tok_s", 0.0), 2),
                         "decode_tok_s": round(self.last.get("decode_tok_s", 0.0), 2),
                         "footprint_bytes": self.footprint()},
            "streaming": [pf.stats() for pf in self.prefetchers],
            "build": self.build,
        }

    def close(self) -> None:
        for pf in self.prefetchers:
            pf.close()
        if self.disk_embed is not None:
            self.disk_embed.close()
        self.monitor.stop()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- helpers -------------------------------------------------------------------------------------

def _streams(u) -> bool:
    """Disk units always stream; "ram" units stream only to a GPU (on a CPU, RAM is where they run)."""
    return u.residency == "disk" or (u.residency == "ram" and not u.device.startswith("cpu"))


def _dropping(weights, files: list[Path]):
    """Read weights and evict their file pages every ~64 tensors, so a load never holds the whole
    file in the page cache on top of the converted weights."""
    count = [0]

    def get(name: str, **kw) -> torch.Tensor:
        t = weights(name, **kw)
        count[0] += 1
        if count[0] % 64 == 0:
            for f in files:
                memory.drop_cache(f)
        return t

    return get


def _load_resident(entry: Entry, spec: ModelSpec, device: str) -> torch.nn.Module:
    """A unit read whole from the cache (O_DIRECT) into memory of its own, tensors bound for good."""
    template, tree = entry.template(spec, "cpu")
    buf = HostBuffer(entry.data_bytes)
    r = DirectReader(entry.path)
    try:
        r.read_into(buf.view, entry.data_offset, entry.data_bytes)
    finally:
        r.close()
    bind(tree, entry.slots, buf.tensor)
    if torch.device(device).type != "cpu":
        for s in entry.slots:
            m = tree[s.module]
            object.__setattr__(m, s.attr, getattr(m, s.attr).to(device))
        del buf
    else:
        object.__setattr__(template, "_hetero_buffer", buf)  # the views keep the mmap alive; so does this
    return template


def _pinned_copy(entry: Entry) -> torch.Tensor:
    buf = HostBuffer(entry.data_bytes, pinned=True)
    r = DirectReader(entry.path)
    try:
        r.read_into(buf.view, entry.data_offset, entry.data_bytes)
    finally:
        r.close()
    return buf.tensor


def unit_configs(plan: Plan, names=None) -> dict[str, UnitConfig]:
    """The plan's choice per unit (all units, or those in `names`: a pipeline stage)."""
    return {u.name: UnitConfig(u.device, u.precision, u.residency) for u in plan.units
            if names is None or u.name in names}


def _assemble(spec: ModelSpec, plan: Plan, entries: dict[str, Entry], weights, prefetch: bool, names=None,
              order: str = "forward"):
    """Every unit of the plan (or of the stage `names`) from the cache, resident or streamed, then
    Decoder.from_units: the same assembler hetero.load and pipeline stages use."""
    cfg = unit_configs(plan, names)
    # streamed units in execution order, one prefetcher per compute device
    by_dev: dict[str, list[StreamItem]] = {}
    experts = _streamed_experts(spec, plan, entries, cfg)
    for u in plan.units:
        if u.name in cfg and u.name != "embed" and _streams(u) and u.name not in experts:
            e = entries[u.name]
            host = _pinned_copy(e) if u.residency == "ram" else None
            by_dev.setdefault(u.device, []).append(StreamItem(u.name, e.data_bytes, None if host is not None else e, host))
    if order == "train":  # backward recomputes the layers last to first: the pass reads them again, reversed
        by_dev = {d: srcs + [s for s in reversed(srcs) if s.name != "head"] for d, srcs in by_dev.items()}
    pfs = {d: Prefetcher(srcs, d, plan.prefetch_depth, prefetch) for d, srcs in by_dev.items()}

    def unit_module(u) -> torch.nn.Module:
        e = entries[u.name]
        if u.name in experts:  # streamed routed experts: one expert at a time through an expert cache
            return experts[u.name].template
        if not _streams(u):
            return _load_resident(e, spec, u.device)
        template, tree = e.template(spec, u.device)
        return StreamedUnit(u.name, template, tree, e.slots, pfs[u.device])

    modules = {name: unit_module(plan.unit(name)) for name in cfg if name != "embed"}
    disk_embed = None
    if "embed" in cfg and ("head" not in cfg or
                           tie_embedding(spec, cfg["embed"], cfg["head"], modules["head"]) is None):
        emb = plan.unit("embed")
        if emb.residency == "disk":
            disk_embed = modules["embed"] = DiskEmbedding(entries["embed"], emb.device, spec)
        else:
            table = _load_resident(entries["embed"], spec, emb.device)
            modules["embed"] = table.weight if isinstance(table, Holder) else table  # tensor or QuantEmbedding
    norm = final_norm(weights, cfg["head"].device) if "head" in cfg else None
    net = Decoder.from_units(spec, modules, cfg, norm)
    streams = list(pfs.values())
    streams += list({id(x.cache): x.cache for x in experts.values()}.values())
    return net, streams, disk_embed


def _streamed_experts(spec: ModelSpec, plan: Plan, entries: dict[str, Entry], cfg: dict) -> dict:
    """unit -> StreamedExperts for every experts unit the plan streams: from disk through one
    ExpertCache in RAM, or from pinned RAM to a GPU through one per GPU (only the experts a pass
    uses cross). Each cache holds at least the planned pool (depth x k experts), more where its
    memory device's budget has room, at most every expert it streams."""
    from hetero.cost import expert_cache_min
    from hetero.runtime.experts import ExpertCache, StreamedExperts, expert_bytes, expert_slots

    groups: dict[tuple[str, str], list] = {}   # (tier, memory device) -> units
    for u in plan.units:
        if u.name in cfg and spec.is_experts_unit(u.name) and _streams(u):
            groups.setdefault(("disk", "cpu") if u.residency == "disk" else ("ram", u.device), []).append(u)
    out = {}
    for (tier, mem), units in groups.items():
        per = max(expert_bytes(ss) for u in units for ss in expert_slots(entries[u.name]).values())
        cap = max(plan.prefetch_depth, 1) * expert_cache_min(spec)
        budget = plan.budgets.get(mem)
        if budget:
            spare = budget - plan.memory.get(mem, 0) - plan.reserve.get(mem, 0)
            cap += max(0, int(0.9 * spare)) // per   # 10% of the headroom left for allocator slack
        cache = ExpertCache(min(cap, len(units) * spec.n_experts), per, tier)
        for u in units:
            e = entries[u.name]
            src = dict(reader=DirectReader(e.path)) if tier == "disk" else dict(host=_pinned_copy(e))
            out[u.name] = StreamedExperts(e, spec, u.device, cache, **src)
    return out


# ---- plans for a run -----------------------------------------------------------------------------

def plan_for_run(model: str | None, plan_path: str | None = None, memory_text: str | None = None,
                 hardware: str | None = None, objective: str = "decode", precisions: list[str] | None = None,
                 prompt_tokens: int = 512, context: int | None = None, replan: bool = True,
                 max_quality_loss: float | None = None, kv_dtype: str | None = None,
                 extra_reserve: dict[str, int] | None = None, batch: int | list[int] = 1,
                 max_latency_ms: float | None = None) -> tuple[Plan, list[str]]:
    """The plan a run executes, and notes to print: the one given (checked against this model and
    machine, re-planned when it no longer fits), or a fresh one for the budgets given.

    Quality: a quantised file runs as stored when it fits; otherwise, without --precisions or a
    bound, the plan keeps quality within plan.sensitivity.DEFAULT_MAX_QUALITY_LOSS, priced by the
    model's shipped sensitivity table where it has one, and drops the bound (with a note) only when
    memory leaves no plan within it.

    The budget covers the whole process: this process's measured baseline is the plan's reserve.
    kv_dtype: how the KV cache is stored and priced (None: a --plan's own, else "auto"); int8 fits
    about twice the context of bf16 in the same budget.
    extra_reserve: bytes per device the caller holds besides the weights (a training step's
    adapters, optimiser state and activations: finetune/plan_train.py), added to the reserve.
    batch: sequences decoded together in the batch runner (N > 1 is priced per ragged step), or a
    list of sizes the planner picks from with the placement (plan/batch.py), each step within
    `max_latency_ms` when given.
    """
    from hetero.hardware.inventory import inventory
    from hetero.plan import check_plan, make_plan, parse_memory
    from hetero.plan.units import fmt_bytes

    from hetero.runtime.firstuse import prepare

    prepare(model)  # first-use artifacts in a child: not in this process's peak or reserve
    spec = resolve_spec(model)
    notes: list[str] = []
    reserve = {"cpu": baseline.runtime_baseline(model), **devices.cuda_reserve()}
    for d, b in (extra_reserve or {}).items():
        reserve[d] = reserve.get(d, 0) + int(b)
    if plan_path:
        plan = Plan.load(plan_path)
        if kv_dtype is not None and kv_dtype != plan.kv_dtype:
            raise HeteroError(f"the plan stores its KV cache as {plan.kv_dtype}; re-plan it for --kv-dtype "
                              f"{kv_dtype} (`hetero plan --kv-dtype {kv_dtype} -o FILE`)")
        here = inventory()
        check_plan(plan, spec, here)
        if plan.host and plan.host != here.host:
            notes.append(f"the plan was made for host {plan.host}; running it on {here.host}")
        why = check_fits(plan)
        if why is None:
            return plan, notes
        if not replan:
            raise HeteroError(f"the plan no longer fits: {why} (re-plan with --memory, or allow --replan)")
        import psutil

        budgets = dict(plan.budgets)
        budgets["cpu"] = min(budgets.get("cpu", 1 << 62), psutil.virtual_memory().available + reserve["cpu"])
        hw, prof = _machine(hardware)
        fresh = make_plan(spec, hw, prof, memory=budgets, objective=plan.objective,
                          prompt_tokens=plan.prompt_tokens, context=plan.context, batch=plan.batch,
                          precisions=list(plan.precisions) or None, reserve=reserve,
                          max_quality_loss=plan.max_quality_loss, kv_dtype=plan.kv_dtype, ragged=plan.ragged)
        notes.append(f"re-planned: {why}; new cpu budget {fmt_bytes(budgets['cpu'])}")
        return fresh, notes
    from hetero.plan.sensitivity import DEFAULT_MAX_QUALITY_LOSS, shipped_sensitivity

    if isinstance(batch, list):
        from hetero.plan.batch import plan_batch

        def make_plan(spec, hw, prof, **kw):  # noqa: F811 (the batch size chosen with the placement)
            return plan_batch(spec, hw, prof, batch, max_latency_ms=max_latency_ms, **kw)
    elif batch > 1:
        from hetero.plan import make_plan as one

        def make_plan(spec, hw, prof, **kw):  # noqa: F811
            return one(spec, hw, prof, batch=batch, ragged=True, **kw)
    hw, prof = _machine(hardware)
    kw = dict(memory=parse_memory(memory_text, spec), objective=objective, prompt_tokens=prompt_tokens,
              context=context, precisions=precisions, reserve=reserve, sensitivity=shipped_sensitivity(spec),
              kv_dtype=kv_dtype or "auto")
    if max_quality_loss is not None:
        return make_plan(spec, hw, prof, max_quality_loss=max_quality_loss, **kw), notes
    if precisions is not None:
        return make_plan(spec, hw, prof, **kw), notes
    if spec.has_block_tensors:
        # A quantised file runs as it is stored (or wider) unless the budget forces a conversion:
        # re-rounding its weights to another grid costs quality the user did not ask to trade.
        try:
            return make_plan(spec, hw, prof, max_quality_loss=0.0, **kw), notes
        except HeteroError:
            notes.append("the file's own formats do not fit this budget: some units are converted to "
                         "smaller ones (pass --precisions to choose)")
    try:
        return make_plan(spec, hw, prof, max_quality_loss=DEFAULT_MAX_QUALITY_LOSS, **kw), notes
    except HeteroError:
        notes.append(f"no plan keeps quality within the default +{DEFAULT_MAX_QUALITY_LOSS:.0%} under these "
                     "budgets: planned without that bound (--max-quality-loss sets it)")
    return make_plan(spec, hw, prof, **kw), notes


def _machine(hardware: str | None):
    from hetero.hardware import machine

    name = hardware or "this"
    hw, prof = machine(name)
    hw = devices.runnable(hw)  # a run plans only devices the engine builds units on
    if name not in ("this", "", "local"):
        # a plan for other hardware cannot run here; planning for it is `hetero plan`'s job
        from hetero.hardware.inventory import inventory

        here = {d.name for d in inventory().devices}
        missing = sorted({d.name for d in hw.devices} - here)
        if missing:
            raise HeteroError(f"--hardware {name} has {', '.join(missing)}, which this machine does not; "
                              "plan it with `hetero plan`, run it where it fits")
    return hw, prof


def summary(plan: Plan) -> str:
    """One line: units by device/precision/residency, memory against budgets, predicted speed."""
    from collections import Counter

    from hetero.plan.units import fmt_bytes

    groups = Counter((u.device, u.precision, u.residency) for u in plan.units)
    parts = ", ".join(f"{n} {d}/{p}/{r}" for (d, p, r), n in groups.items())
    mem = ", ".join(f"{d} {fmt_bytes(plan.memory.get(d, 0) + plan.reserve.get(d, 0))} of "
                    f"{fmt_bytes(b)}" for d, b in plan.budgets.items() if plan.memory.get(d, 0))
    p = plan.predicted
    cap = plan.kv_capacity()
    if cap:
        mem += (f" | KV {plan.kv_dtype} {fmt_bytes(cap['bytes'])} for {plan.batch} x {plan.context} tokens "
                f"(the budget holds up to {cap['max_context']:,})")
    return (f"plan: {parts} | {mem} | predicted prefill {p.prefill_tok_s:.1f} tok/s, "
            f"decode {p.decode_tok_s:.2f} tok/s")
