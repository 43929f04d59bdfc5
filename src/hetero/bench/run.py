"""One measured configuration, in a process of its own: plan (or take a plan), build, measure, compare.

A fresh process per configuration keeps footprints honest: the peak RSS of a process only grows, so
a second model measured in the same process would inherit the first one's peak.

    python -m hetero.bench.run '{"model": ..., "precision": "int8", "residency": "disk", ...}'

prints one JSON object: {"config", "plan", "result": compare(...), "seconds"} (see measure.compare).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from hetero.errors import HeteroError


@dataclass(frozen=True)
class Config:
    """A point of the grid: a model at one precision, resident or with its layers on disk."""
    model: str
    precision: str = "bf16"
    residency: str = "resident"   # resident | disk (every decoder layer streamed with O_DIRECT)
    context: int = 128
    prompt_tokens: int = 64
    new_tokens: int = 32
    repeats: int = 3
    memory: str = ""              # set: the planner's pick under this budget (precision/residency unused)

    @property
    def label(self) -> str:
        if self.memory:
            return f"{self.model} planner pick ({self.memory}) ctx{self.context}"
        return f"{self.model} {self.precision} {self.residency} ctx{self.context}"


def config_plan(spec, hw, profile, precision: str, residency: str, prompt_tokens: int, context: int,
                reserve: dict[str, int] | None = None, budgets: dict[str, int] | None = None):
    """A uniform plan (every unit on cpu at `precision`; layers on disk when residency is disk),
    priced by the cost model like any hand-edited plan."""
    from hetero.plan import rescore
    from hetero.plan.make import default_budgets
    from hetero.plan.plan import Plan, Prediction, UnitPlan

    units = tuple(UnitPlan(u, "cpu", precision, residency if u.startswith("layers.") else "resident",
                           spec.unit_bytes(u, precision)) for u in spec.unit_names())
    plan = Plan(model=spec.name, fingerprint=spec.fingerprint(), host=hw.host, hardware=hw.source,
                objective="decode", prompt_tokens=prompt_tokens, context=context, batch=1,
                budgets=default_budgets(hw, budgets), units=units, memory={},
                predicted=Prediction(0, 0, 0, 0, 0, 0), reserve=dict(reserve or {}),
                precisions=(precision,), kind=f"uniform {precision} {residency}")
    return rescore(plan, spec, hw, profile)


def measure_plan(plan, model: str | None, prompt_tokens: int, new_tokens: int, context: int | None,
                 repeats: int, monitor=None, progress: bool = False, prefetch: bool | None = None) -> dict:
    """Build `plan`, measure it, and compare with its predictions (see measure.compare)."""
    from hetero.bench.measure import compare, measure_engine
    from hetero.progress import progress_bar
    from hetero.runtime.engine import Engine

    eng = Engine.load(plan, model, progress=progress, monitor=monitor, prefetch=prefetch)
    try:
        with progress_bar(f"measuring {plan.model}", 1 + repeats, enabled=progress) as advance:
            m = measure_engine(eng, prompt_tokens, new_tokens, context, repeats=repeats, advance=advance)
        out = compare(plan, m)
        out["streaming"] = eng.report().get("streaming", [])
        out["build"] = eng.build
        return out
    finally:
        eng.close()


def run_config(cfg: Config, calibration: dict[str, float] | None = None) -> dict:
    """In this process: footprint monitor first, then the runtime's baseline, plan, build, measure."""
    import dataclasses

    from hetero.hardware import machine
    from hetero.model.sources import resolve_spec
    from hetero.runtime import baseline, memory

    t0 = time.perf_counter()
    mon = memory.Footprint().start()
    reserve = {"cpu": baseline.runtime_baseline(cfg.model)}
    hw, prof = machine("this")
    if calibration is not None and prof is not None:
        prof = dataclasses.replace(prof, calibration=dict(calibration))
    spec = resolve_spec(cfg.model)
    if cfg.memory:
        from hetero.plan import make_plan, parse_memory

        plan = make_plan(spec, hw, prof, memory=parse_memory(cfg.memory, spec), prompt_tokens=cfg.prompt_tokens,
                         context=cfg.context, reserve=reserve, explain=False)
    else:
        plan = config_plan(spec, hw, prof, cfg.precision, cfg.residency, cfg.prompt_tokens, cfg.context,
                           reserve, budgets=None)
    res = measure_plan(plan, cfg.model, cfg.prompt_tokens, cfg.new_tokens, cfg.context, cfg.repeats, monitor=mon)
    return {"config": asdict(cfg), "plan": plan.to_dict(), "result": res,
            "seconds": round(time.perf_counter() - t0, 2)}


def run_in_subprocess(cfg: Config, timeout: float = 1800.0) -> dict:
    """run_config in a fresh interpreter (honest peak footprint); raises HeteroError on failure."""
    env = dict(os.environ)
    try:
        p = subprocess.run([sys.executable, "-m", "hetero.bench.run", json.dumps(asdict(cfg))],
                           capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise HeteroError(f"{cfg.label}: no result within {timeout:.0f} s") from None
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise HeteroError(f"{cfg.label}: the measuring process failed: {tail}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    import warnings

    warnings.simplefilter("ignore")
    try:
        cfg = Config(**json.loads(argv[0]))
        print(json.dumps(run_config(cfg)))
    except HeteroError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
