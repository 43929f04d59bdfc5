"""The sweep: a grid of plans (precision x residency x context) under one memory budget, each measured
in its own process, beside the planner's own pick under the same budget.

It answers two questions: how far off the cost model is across the grid (the error distribution),
and whether the plan the planner picks is the one that measures best among those that fit.
"""
from __future__ import annotations

from hetero.bench.calibrate import error_summary
from hetero.bench.run import Config, config_plan, run_in_subprocess
from hetero.errors import HeteroError

OVER = 1.05  # a measured footprint above budget x this is flagged over_budget


def _errors(run: dict) -> dict:
    r = run["result"]
    return {"config": Config(**run["config"]).label, "decode_error": r["error"]["decode_tok_s"],
            "prefill_error": r["error"]["prefill_tok_s"],
            "footprint_error": r["error"]["footprint_bytes"].get("cpu")}


def candidates(model: str, memory: str, precisions: list[str], residencies: list[str], context: int,
               prompt_tokens: int) -> tuple[list[tuple[str, str]], list[dict]]:
    """Grid points the cost model says fit the budget, and notes for those it says do not."""
    from hetero.hardware import machine
    from hetero.model.sources import resolve_spec
    from hetero.plan import parse_memory
    from hetero.plan.units import fmt_bytes
    from hetero.runtime.baseline import runtime_baseline

    spec = resolve_spec(model)
    budget = parse_memory(memory, spec).get("cpu")
    hw, prof = machine("this")
    reserve = {"cpu": runtime_baseline(model)}
    fit, skipped = [], []
    for p in precisions:
        for r in residencies:
            plan = config_plan(spec, hw, prof, p, r, prompt_tokens, context, reserve)
            need = plan.memory.get("cpu", 0) + reserve["cpu"]
            if budget is not None and need > budget:
                skipped.append({"config": f"{model} {p} {r} ctx{context}",
                                "why": f"needs {fmt_bytes(need)} > budget {fmt_bytes(budget)}"})
            else:
                fit.append((p, r))
    return fit, skipped


def sweep(model: str, memory: str, precisions: list[str], residencies: list[str], contexts: list[int],
          prompt_tokens: int = 64, new_tokens: int = 32, repeats: int = 3, progress: bool = True) -> dict:
    """{"budget", "contexts": [{context, pick, best, pick_vs_best, within_5pct, runs, skipped}], "errors"}."""
    from hetero.model.sources import resolve_spec
    from hetero.plan import parse_memory
    from hetero.progress import progress_bar

    budget = parse_memory(memory, resolve_spec(model)).get("cpu")
    if budget is None:
        raise HeteroError("the sweep needs a cpu budget, e.g. --memory cpu=50%")
    out, all_runs = [], []
    plan_pts = {C: candidates(model, memory, precisions, residencies, C, prompt_tokens) for C in contexts}
    total = sum(1 + len(pts) for pts, _ in plan_pts.values())
    with progress_bar(f"sweep {model}", total, enabled=progress) as advance:
        for C in contexts:
            pts, skipped = plan_pts[C]
            base = dict(model=model, context=C, prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=repeats)
            pick = run_in_subprocess(Config(**base, memory=memory))
            advance()
            runs = []
            for p, r in pts:
                try:
                    runs.append(run_in_subprocess(Config(**base, precision=p, residency=r)))
                except HeteroError as e:
                    skipped.append({"config": f"{model} {p} {r} ctx{C}", "why": str(e)})
                advance()
            # the same rule for every plan, the planner's own: predicted footprint within the budget;
            # measured footprints are reported beside it (over_budget), not used to pick the winner
            fitting = runs + [pick]
            best = max(fitting or [pick], key=lambda x: x["result"]["measured"]["decode_tok_s"])
            pm, bm = (x["result"]["measured"]["decode_tok_s"] for x in (pick, best))
            pick_units = {(u["precision"], u["residency"]) for u in pick["plan"]["units"]}
            out.append({"context": C, "pick": _describe(pick_units), "pick_decode_tok_s": pm,
                        "pick_footprint": pick["result"]["measured"]["footprint_bytes"].get("cpu"),
                        "best": Config(**best["config"]).label if best is not pick else "the pick",
                        "best_decode_tok_s": bm, "pick_vs_best": pm / bm if bm else None,
                        "within_5pct": bool(bm and pm >= 0.95 * bm),
                        "runs": [_errors(x) | {"measured_decode_tok_s": x["result"]["measured"]["decode_tok_s"],
                                               "footprint": x["result"]["measured"]["footprint_bytes"].get("cpu"),
                                               "over_budget": x["result"]["measured"]["footprint_bytes"].get("cpu", 0)
                                               > budget * OVER}
                                 for x in runs + [pick]],
                        "skipped": skipped})
            all_runs += runs + [pick]
    return {"model": model, "budget": memory, "budget_bytes": budget, "contexts": out,
            "errors": error_summary([_errors(x) for x in all_runs]), "raw": all_runs}


def _describe(units: set[tuple[str, str]]) -> str:
    return ", ".join(f"{p}/{r}" for p, r in sorted(units))
