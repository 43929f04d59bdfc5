"""The Python half of benchmarks/gpu_check.sh: a partial-offload curve, measured against the plan.

    python benchmarks/gpu_check.py --out FILE [--dry-run] [--model synthetic:llama-1b]
                                   [--pytest-rc N --pytest-log FILE] [--profile quick|none]

For 0, 25, 50, 75 and 100% of the decoder layers on cuda:0 (the first layers; the embedding goes
with layer 0, the head with the last layer), every unit bf16 and resident: the cost model's
prediction for the placement (plan.rescore on this machine's inventory and, with --profile quick,
its measured profile) and the measured prefill and decode tok/s (bench.measure.measure_engine).
Also the CUDA context this process holds, against the reserve plans keep for it.

--dry-run needs no GPU: the same plans are priced for catalog:h200, and the same measuring code
runs on synthetic:tiny under hetero.runtime.devices.simulated_cuda (plumbing, not CUDA: its
figures are CPU figures). Not run on a GPU yet.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

SCHEMA = 1
FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)


def placement(spec, fraction: float, precision: str = "bf16"):
    """A plan with the first `fraction` of the layers on cuda:0 and the rest on the CPU."""
    from hetero.plan.plan import Plan, Prediction, UnitPlan

    n = spec.n_layers
    k = round(fraction * n)
    dev = {f"layers.{i}": ("cuda:0" if i < k else "cpu") for i in range(n)}
    dev["embed"] = dev["layers.0"] if n else "cpu"
    dev["head"] = dev[f"layers.{n - 1}"] if n else "cpu"
    units = tuple(UnitPlan(u, dev[u], precision, "resident", spec.unit_bytes(u, precision)) for u in spec.unit_names())
    return Plan(model=spec.name, fingerprint=spec.fingerprint(), host="", hardware="", objective="decode",
                prompt_tokens=128, context=160, batch=1, budgets={}, units=units, memory={},
                predicted=Prediction(0, 0, 0, 0, 0, 0), precisions=(precision,), prefetch=True), k


def priced(plan, spec, hw, profile):
    """The plan as the cost model prices it on `hw`, with the CUDA reserve and generous budgets."""
    from hetero.plan import rescore
    from hetero.runtime.devices import cuda_reserve

    budgets = {d.name: d.memory_bytes for d in hw.devices}
    plan = dataclasses.replace(plan, host=hw.host, hardware=hw.source, budgets=budgets,
                               reserve=cuda_reserve(hw))
    return rescore(plan, spec, hw, profile)


def cuda_context_bytes() -> int | None:
    """Device memory this process holds outside torch's allocator (the context, cuBLAS handles)."""
    import torch

    if not torch.cuda.is_available():
        return None
    torch.ones(1, device="cuda:0") @ torch.ones(1, 1, device="cuda:0")  # context + cuBLAS up
    free, total = torch.cuda.mem_get_info(0)
    return int(total - free - torch.cuda.memory_reserved(0))


def curve(model: str, hw, profile, measure: bool, prompt: int, new: int, repeats: int,
          rows: list[dict] | None = None, on_row=lambda: None) -> list[dict]:
    import hetero
    from hetero.bench.measure import measure_engine
    from hetero.runtime.engine import Engine

    spec = hetero.spec(model)
    rows = [] if rows is None else rows
    for f in FRACTIONS:
        plan, k = placement(spec, f)
        plan = dataclasses.replace(priced(plan, spec, hw, profile), prompt_tokens=prompt, context=prompt + new)
        p = plan.predicted
        row = {"fraction": f, "gpu_layers": k, "layers": spec.n_layers,
               "predicted": {"prefill_tok_s": round(p.prefill_tok_s, 2), "decode_tok_s": round(p.decode_tok_s, 2),
                             "memory_bytes": dict(plan.memory), "reserve_bytes": dict(plan.reserve)},
               "measured": None}
        if measure:
            t0 = time.perf_counter()
            with Engine.load(plan, model, progress=False) as e:
                m = measure_engine(e, prompt_tokens=prompt, new_tokens=new, repeats=repeats, unit_split=False)
            row["measured"] = {"prefill_tok_s": round(m.prefill_tok_s.median, 2),
                               "decode_tok_s": round(m.decode_tok_s.median, 2),
                               "decode_spread": round(m.decode_tok_s.spread, 3),
                               "footprint_bytes": m.footprint_bytes, "seconds": round(time.perf_counter() - t0, 1)}
            row["error"] = {k2: round((row["predicted"][k2] - row["measured"][k2]) / row["measured"][k2], 3)
                            for k2 in ("prefill_tok_s", "decode_tok_s") if row["measured"][k2]}
        rows.append(row)
        on_row()
        print(f"{f:4.0%} on GPU: predicted prefill {row['predicted']['prefill_tok_s']:.1f} / decode "
              f"{row['predicted']['decode_tok_s']:.2f} tok/s; measured "
              + (f"{row['measured']['prefill_tok_s']:.1f} / {row['measured']['decode_tok_s']:.2f}"
                 if row["measured"] else "-"), flush=True)
    return rows


def write_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--model", default="synthetic:llama-1b")
    ap.add_argument("--profile", choices=("quick", "none"), default="quick")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--pytest-rc", type=int, default=None)
    ap.add_argument("--pytest-log", default=None)
    a = ap.parse_args(argv)
    import torch

    import hetero
    from hetero.hardware.catalog import resolve
    from hetero.runtime.devices import CUDA_CONTEXT_BYTES, cuda_reserve_bytes, simulated_cuda

    t0 = time.perf_counter()
    out: dict = {"schema": SCHEMA, "dry_run": a.dry_run, "model": a.model, "torch": torch.__version__,
                 "cuda": torch.cuda.is_available(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "reserve": {"cuda_context_bytes_assumed": CUDA_CONTEXT_BYTES,
                             "cuda_reserve_bytes": cuda_reserve_bytes(), "cuda_context_bytes_measured": None}}
    if a.pytest_log:
        log = Path(a.pytest_log).read_text(errors="replace").splitlines() if Path(a.pytest_log).exists() else []
        out["pytest"] = {"rc": a.pytest_rc,
                         "summary": [ln for ln in log if any(w in ln for w in ("passed", "failed", "error", "skipped"))][-4:]}
    if a.dry_run:
        out["gpu"] = None
        # the GPU run's plans, priced for a catalog H200 (no weights read) ...
        out["curve"] = curve(a.model, resolve("catalog:h200"), None, False, a.prompt_tokens, a.new_tokens, 1)
        # ... and the measuring code on a tiny model with CUDA simulated on the CPU (plumbing only)
        with simulated_cuda():
            out["plumbing"] = curve("synthetic:tiny", resolve("catalog:h200"), None, True, 8, 3, 1)
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device here (use --dry-run)", file=sys.stderr)
            return 2
        from hetero.hardware.inventory import inventory

        p = torch.cuda.get_device_properties(0)
        out["gpu"] = {"name": p.name, "memory_bytes": int(p.total_memory), "capability": f"{p.major}.{p.minor}"}
        out["reserve"]["cuda_context_bytes_measured"] = cuda_context_bytes()
        hetero.spec(a.model)
        hw = inventory()
        prof = None
        if a.profile == "quick":
            from hetero.hardware.profile import get_profile

            t1 = time.perf_counter()
            prof = get_profile(progress=False)
            out["profile_s"] = round(time.perf_counter() - t1, 1)
        out["curve"] = []
        curve(a.model, hw, prof, True, a.prompt_tokens, a.new_tokens, a.repeats, out["curve"],
              lambda: write_atomic(Path(a.out), out))
    out["seconds"] = round(time.perf_counter() - t0, 1)
    write_atomic(Path(a.out), out)
    print(f"wrote {a.out} in {out['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
