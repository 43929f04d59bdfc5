"""`hetero bench`: measured vs predicted for a plan, peers side by side, calibration, sweep, report."""
from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from hetero.commands.model import KV_HELP


def _list(text: Optional[str]) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def _ints(text: str, flag: str) -> list[int]:
    from hetero.errors import HeteroError

    try:
        out = [int(x) for x in _list(text)]
    except ValueError:
        raise HeteroError(f"{flag} takes integers separated by commas, got {text!r}") from None
    if not out or min(out) < 2:
        raise HeteroError(f"{flag} needs context lengths of at least 2, got {text!r}")
    return out


def _batches(text: str) -> list[int]:
    """--batch: auto (the planner's candidate sizes), a size, or sizes separated by commas."""
    from hetero.plan.batch import parse_batches

    return parse_batches(text)


def _bench_batches(plan, model, batches, prompt_tokens, new_tokens, repeats, as_json, hardware=None) -> dict:
    """--batch: aggregate decode tok/s per batch size (bench/batched.py), B=1 also on the single path,
    beside the cost model's prediction for the same placement at that size (bench/batched.predict_batches)."""
    from hetero.bench.batched import measure_batches, predict_batches
    from hetero.runtime.engine import Engine

    if plan.batch_options and not batches:  # --batch auto: every size the planner found room for
        batches = [o.batch for o in plan.batch_options if o.fits]
    predicted = predict_batches(plan, model, batches, hardware)
    with Engine.load(plan, model, progress=not as_json) as eng:
        rows = measure_batches(eng.model.net, batches, prompt_tokens, new_tokens, repeats)
    for r in rows:
        p = predicted[r["batch"]]
        r["predicted_decode_tok_s"] = round(p, 2)
        r["error"] = round(p / r["decode_tok_s"] - 1, 4) if r["decode_tok_s"] > 0 else None
    out = {"model": model, "plan": plan.to_dict(), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
           "chosen_batch": plan.batch if plan.batch_options else None, "batches": rows}
    if as_json:
        print(json.dumps(out))
        return out
    from rich.console import Console
    from rich.table import Table

    t = Table("batch", "path", "decode tok/s (all)", "predicted", "error", "tok/s per sequence", "prefill s", "KV pool",
              title=f"hetero bench {model} --batch (P={prompt_tokens}, N={new_tokens}; predicted: this placement "
                    "at each size)")
    for r in rows:
        mark = " *" if plan.batch_options and r["batch"] == plan.batch else ""
        t.add_row(f"{r['batch']}{mark}", r["path"], f"{r['decode_tok_s']:.1f}", f"{r['predicted_decode_tok_s']:.1f}",
                  "—" if r["error"] is None else f"{r['error'] * 100:+.0f}%", f"{r['per_seq_tok_s']:.1f}",
                  f"{r['prefill_s']:.3f}" if "prefill_s" in r else "—",
                  f"{r['kv_blocks']} blocks, {r['kv_bytes'] / 1e6:.1f} MB" if "kv_blocks" in r else "—")
    c = Console()
    c.print(t)
    if plan.batch_options:
        from hetero.plan.explain import batch_table

        c.print(batch_table(plan))
        best = max((r for r in rows if r["path"] == "batched"), key=lambda r: r["decode_tok_s"], default=None)
        if best is not None:
            mine = next((r["decode_tok_s"] for r in rows if r["path"] == "batched" and r["batch"] == plan.batch), None)
            if mine:
                c.print(f"chosen batch {plan.batch}: {mine:.1f} tok/s measured, {mine / best['decode_tok_s']:.2f}x "
                        f"the measured best (batch {best['batch']}, {best['decode_tok_s']:.1f} tok/s)")
    return out


SWEEP_PRECISIONS = ("fp32", "bf16", "int8", "int4")
SWEEP_RESIDENCIES = ("resident", "disk")


def _grid(model, precisions, residencies, contexts, P, N, repeats):
    from hetero.bench.run import Config

    # the prompt takes at most half the context; decode steps are timed at its end
    return [Config(model, p, r, C, min(P, C // 2), min(N, C - min(P, C // 2)), repeats)
            for C in contexts for p in precisions for r in residencies]


def calibration_grid(spec, plan) -> tuple[list[str], list[str]]:
    """--calibrate's default grid: what the command then measures, the plan's own precisions and
    residencies (a quantised file: also `native`, which the plan after this calibration may pick
    even where the one before it did not)."""
    precs = {u.precision for u in plan.units} | ({"native"} if spec.has_block_tensors else set())
    res = {u.residency for u in plan.units} - {"ram"}  # the grid streams from disk or keeps resident
    return sorted(precs), sorted(res) or ["resident"]


def calibrate_model(model: str, precisions, residencies, contexts, P, N, repeats, progress: bool) -> dict:
    """Measure the grid (one process per point), fit, store into the cached Profile; the fit's dict."""
    from hetero.bench.calibrate import fit, store
    from hetero.bench.run import run_in_subprocess
    from hetero.hardware import machine
    from hetero.progress import progress_bar

    grid = _grid(model, precisions, residencies, contexts, P, N, repeats)
    runs = []
    with progress_bar(f"calibration runs ({model})", len(grid), enabled=progress) as advance:
        for cfg in grid:
            runs.append(run_in_subprocess(cfg))
            advance()
    hw, prof = machine("this")
    f = fit(runs, hw, prof)
    store(f, prof)
    return f.to_dict()


def _rates(hw, prof) -> dict:
    from hetero.cost import device_rates

    return {d: {"gemm": r.gemm, "gemv": r.gemv, "mem": r.mem, "overhead": r.overhead}
            for d, r in device_rates(hw, prof).items()}


def _print(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console()
    pr, me, er, sp = result["predicted"], result["measured"], result["error"], result["measured"]["spread"]
    t = Table("metric", "predicted", "measured (median)", "min–max", "error", title=f"hetero bench {result['model']}")
    rng = me["ranges"]
    for k in ("ttft_s", "prefill_tok_s", "decode_tok_s"):
        e = er.get(k)
        t.add_row(k, f"{pr[k]:.4g}", f"{me[k]:.4g}", f"{rng[k][0]:.4g}–{rng[k][1]:.4g}",
                  "—" if e is None else f"{e * 100:+.1f}%")
    for d, v in me["footprint_bytes"].items():
        p = pr["footprint_bytes"].get(d)
        e = er["footprint_bytes"].get(d)
        t.add_row(f"footprint {d}", f"{(p or 0) / 1e6:.1f} MB", f"{v / 1e6:.1f} MB", "",
                  "—" if e is None else f"{e * 100:+.1f}%")
    c.print(t)
    units = Table("unit", "decode pred ms", "decode meas ms", "error", "prefill pred ms", "prefill meas ms", "error")
    names = list(me["unit_decode_ms"])
    rows = names if len(names) <= 12 else names[:4] + [None] + names[-3:]
    for n in rows:
        if n is None:
            units.add_row("…", "", "", "", "", "", "")
            continue
        ed, ep = er["unit_decode_ms"].get(n), er["unit_prefill_ms"].get(n)
        units.add_row(n, f"{pr['unit_decode_ms'][n]:.3f}", f"{me['unit_decode_ms'][n]:.3f}",
                      "—" if ed is None else f"{ed * 100:+.0f}%", f"{pr['unit_prefill_ms'][n]:.3f}",
                      f"{me['unit_prefill_ms'][n]:.3f}", "—" if ep is None else f"{ep * 100:+.0f}%")
    c.print(units)
    for name, t in result.get("terms_ms", {}).items():  # what the prediction is made of
        for phase in ("decode", "prefill"):
            parts = ", ".join(f"{k} {v:.3f}" for k, v in t[phase].items() if v)
            c.print(f"predicted {name} {phase} ms at {t['rate_precision']} rates: {parts} "
                    f"(gemm and memory overlap: the larger counts)")
    for p in result.get("peers", []):
        if "skipped" in p:
            c.print(f"peer {p['peer']}: skipped ({p['skipped']})")
        else:
            c.print(f"peer {p['peer']}: prefill {p['prefill_tok_s']['median']:.1f} tok/s, decode "
                    f"{p['decode_tok_s']['median']:.2f} tok/s, footprint {p['footprint_bytes']['cpu'] / 1e6:.0f} MB"
                    f" ({p.get('note', '')})")
    cal = result.get("calibration")
    if cal:
        for k, s in cal["summary"].items():
            if isinstance(s, dict) and "decode_error" in s:
                c.print(f"calibration {k}: decode median |error| {s['decode_error']['median_abs'] * 100:.1f}% "
                        f"(worst {s['decode_error']['max_abs'] * 100:.1f}%), prefill "
                        f"{s['prefill_error']['median_abs'] * 100:.1f}% (worst {s['prefill_error']['max_abs'] * 100:.1f}%)")
    sw = result.get("sweep")
    if sw:
        for row in sw["contexts"]:
            c.print(f"sweep ctx {row['context']}: pick {row['pick']} {row['pick_decode_tok_s']:.2f} tok/s; best "
                    f"{row['best']} {row['best_decode_tok_s']:.2f} tok/s; pick/best {row['pick_vs_best']:.3f}"
                    f" ({'within' if row['within_5pct'] else 'NOT within'} 5%)")


def register(app: typer.Typer) -> None:
    @app.command()
    def bench(
        model: Optional[str] = typer.Argument(None, help="a .gguf file, an HF dir, smollm2-135m or synthetic:NAME"),
        plan_file: Optional[str] = typer.Option(None, "--plan", help="measure this plan (JSON from `hetero plan -o`)"),
        memory: Optional[str] = typer.Option(None, "--memory", "-m", help="plan for these budgets, e.g. cpu=50%"),
        hardware: Optional[str] = typer.Option(None, "--hardware", help="plan with this hardware (default: this)"),
        objective: str = typer.Option("decode", "--objective", help="decode | ttft | throughput"),
        precisions: Optional[str] = typer.Option(None, "--precisions", help="precisions the planner may use"),
        max_quality_loss: Optional[float] = typer.Option(None, "--max-quality-loss", help="keep the summed quality cost within q (relative perplexity increase; default 0.01 = +1% unless --precisions or --dtype is given; a quantised file runs as stored)."),
        context: Optional[int] = typer.Option(None, "--context", help="context at the decode steps timed (default P+N)"),
        prompt_tokens: int = typer.Option(512, "--prompt-tokens", help="prompt length P (seeded random ids)"),
        new_tokens: int = typer.Option(128, "--new-tokens", help="decode steps timed per repeat"),
        repeats: int = typer.Option(3, "--repeats", help="timed repeats (after one warm-up)"),
        peers: Optional[str] = typer.Option(None, "--peers", help="llama.cpp,transformers,accelerate (each if installed)"),
        report: Optional[str] = typer.Option(None, "--report", help="write report.md and PNG figures into this folder"),
        as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
        calibrate: bool = typer.Option(False, "--calibrate", help="measure a grid, fit the cost model, store it in the Profile"),
        sweep: bool = typer.Option(False, "--sweep", help="measure a grid under --memory beside the planner's pick"),
        grid_precisions: Optional[str] = typer.Option(None, "--grid-precisions", help="grid for --calibrate/--sweep "
                                                      "(default: --calibrate the precisions of the plan it measures, "
                                                      "`native` for a quantised file; --sweep fp32,bf16,int8,int4)"),
        grid_residencies: Optional[str] = typer.Option(None, "--grid-residencies", help="grid for --calibrate/--sweep "
                                                       "(default: --calibrate the plan's, --sweep resident,disk)"),
        grid_contexts: Optional[str] = typer.Option(None, "--grid-contexts", help="grid for --calibrate/--sweep "
                                                    "(default: --calibrate 128,512,1024: prompts of 64, 256 and 512 "
                                                    "tokens tell the GEMMs, the dequantise pass and attention apart; "
                                                    "--sweep 128,1024)"),
        batch: Optional[str] = typer.Option(None, "--batch", help="aggregate decode tok/s with B sequences per forward, "
                                            "e.g. 1,4,8,16, beside the predicted; auto: the planner picks the batch "
                                            "with the placement, and each of its sizes is measured"),
        max_latency_ms: Optional[float] = typer.Option(None, "--max-latency-ms", help="with --batch: the planner's "
                                                       "batch keeps a step within this many ms"),
        kv_dtype: Optional[str] = typer.Option(None, "--kv-dtype", help=KV_HELP),
    ):
        """Measure MODEL under a plan: TTFT, prefill and decode tok/s (median and spread), per-unit times
        and peak footprint, against the plan's predictions; peers side by side; --calibrate closes the loop."""
        import warnings

        from hetero.errors import HeteroError

        warnings.simplefilter("ignore")
        if min(prompt_tokens, new_tokens, repeats) < 1:
            raise HeteroError("--prompt-tokens, --new-tokens and --repeats must be at least 1")
        if repeats > 1000 or max(prompt_tokens, new_tokens) > 1 << 24:
            raise HeteroError("--repeats is at most 1000, --prompt-tokens and --new-tokens at most 16M")
        if max_quality_loss is not None and not max_quality_loss >= 0:
            raise HeteroError(f"--max-quality-loss must be >= 0 (got {max_quality_loss})")
        if plan_file and (memory or precisions):
            raise HeteroError("give either --plan or planning flags (--memory, --precisions), not both")
        if report:
            from hetero.paths import check_output_dir

            out_dir = check_output_dir(report)
            # the report dir is replaced whole: only an empty dir or an earlier report may be
            if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "report.md").is_file():
                raise HeteroError(f"{out_dir} is not empty and holds no report.md; --report replaces the "
                                  "whole directory, so give a new or report directory")
        from hetero.bench.peers import PEERS

        peer_list = _list(peers)
        for p in peer_list:
            if p not in PEERS:
                raise HeteroError(f"unknown peer {p!r}; known: {', '.join(PEERS)}")
        precs = _list(grid_precisions) or list(SWEEP_PRECISIONS)
        res = _list(grid_residencies) or list(SWEEP_RESIDENCIES)
        bad = [r for r in res if r not in ("resident", "disk")]
        if bad:
            raise HeteroError(f"--grid-residencies takes resident,disk; got {bad[0]!r}")
        ctxs = _ints(grid_contexts or ("128,512,1024" if calibrate else "128,1024"), "--grid-contexts")
        batches = _batches(batch) if batch is not None else None
        auto = batch is not None and batch.strip().lower() == "auto"
        if batches and (calibrate or sweep or peer_list or report):
            raise HeteroError("--batch measures on its own: leave out --calibrate, --sweep, --peers and --report")
        if sweep and not memory:
            raise HeteroError("--sweep compares plans under one budget: give --memory, e.g. cpu=50%")
        if context is not None and context < prompt_tokens + 1:
            raise HeteroError(f"--context {context} leaves no room after a {prompt_tokens}-token prompt")
        from hetero.model.sources import resolve_spec
        from hetero.runtime import engine as eng

        model = model or "smollm2-135m"
        resolve_spec(model)  # a bad model name fails here, before any measuring
        progress = not as_json
        out: dict = {}
        if calibrate:
            # by default the grid is what this command then measures: the plan's own precisions (a
            # quantised file: native, priced at its stored formats' rates) and residencies
            c_precs, c_res = precs, res
            if grid_precisions is None or grid_residencies is None:
                p0, _ = eng.plan_for_run(model, plan_file, memory, hardware, objective, _list(precisions) or None,
                                         prompt_tokens=prompt_tokens, context=context or prompt_tokens + new_tokens,
                                         max_quality_loss=max_quality_loss)
                g_precs, g_res = calibration_grid(resolve_spec(model), p0)
                c_precs = precs if grid_precisions is not None else g_precs
                c_res = res if grid_residencies is not None else g_res
            out["calibration"] = calibrate_model(model, c_precs, c_res, ctxs, prompt_tokens,
                                                 new_tokens, repeats, progress)
        if sweep:
            from hetero.bench.sweep import sweep as run_sweep

            p_sw = min(prompt_tokens, min(ctxs) // 2)
            sw = run_sweep(model, memory, precs, res, ctxs, p_sw, min(new_tokens, min(ctxs) - p_sw), repeats, progress)
            sw.pop("raw")
            out["sweep"] = sw
        from hetero.bench.run import measure_plan
        from hetero.hardware import machine
        from hetero.runtime.memory import Footprint

        mon = Footprint().start()
        ctx = context or prompt_tokens + new_tokens
        # --batch auto or several sizes: the planner picks among them with the placement (plan/batch.py)
        pick = batches if batches and (len(batches) > 1 or auto) else None
        plan, notes = eng.plan_for_run(model, plan_file, memory, hardware, objective, _list(precisions) or None,
                                       prompt_tokens=prompt_tokens, context=ctx, max_quality_loss=max_quality_loss,
                                       kv_dtype=kv_dtype, batch=pick or (batches[0] if batches else 1),
                                       max_latency_ms=max_latency_ms)
        if not as_json:
            print(eng.summary(plan), file=sys.stderr)
            for n in notes:
                print(f"note: {n}", file=sys.stderr)
        if batches:
            # auto: the sizes that fit, as the plan priced them (a --plan: its own options, else the list)
            _bench_batches(plan, model, None if auto and plan.batch_options else batches, prompt_tokens,
                           new_tokens, repeats, as_json, hardware)
            return
        result = measure_plan(plan, model, prompt_tokens, new_tokens, ctx, repeats, monitor=mon, progress=progress)
        hw, prof = machine(hardware or "this")
        precs_used = {u.precision for u in plan.units}
        dtype = next(iter(precs_used)) if precs_used <= {"fp32"} or precs_used <= {"bf16"} else "bf16"
        budget = plan.budgets.get("cpu", 0) - plan.reserve.get("cpu", 0) if memory or plan_file else None
        peer_rows = []
        if peer_list:
            from hetero.bench.peers import run_peers

            peer_rows = run_peers(peer_list, model, prompt_tokens, new_tokens, repeats, dtype, budget)
        from hetero.bench.terms import terms

        full = {"model": model, "notes": notes, **result, "peers": peer_rows, "roofline": _rates(hw, prof),
                "terms_ms": terms(plan, resolve_spec(model), hw, prof), "plan": plan.to_dict(), **out}
        if report:
            from hetero.bench.report import render

            try:
                render(full, report)
            except OSError as e:
                raise HeteroError(f"cannot write the report to {report}: {e.strerror or e}") from None
            if not as_json:
                print(f"report: {report}/report.md", file=sys.stderr)
        if as_json:
            print(json.dumps(full))
        else:
            _print(full)
