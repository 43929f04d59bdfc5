"""`hetero plan`: the fastest placement x precision x residency within budgets, and why."""
from __future__ import annotations

from typing import Optional

import typer

from hetero.commands.model import KV_HELP


def register(app: typer.Typer) -> None:
    @app.command()
    def plan(
        model: Optional[str] = typer.Argument(None, help="a .gguf file, an HF dir, smollm2-135m or synthetic:NAME"),
        memory: Optional[str] = typer.Option(None, "--memory", "-m",
                                             help="budgets: cpu=2GB,cuda:0=4GiB,disk=50GB or cpu=25% (of the bf16 size)"),
        hardware: str = typer.Option("this", "--hardware",
                                     help="this | catalog:PARTS (e.g. catalog:rtx4090+ram64g+nvme) | a HardwareSpec JSON file"),
        objective: str = typer.Option("decode", "--objective", help="decode | ttft | throughput"),
        prompt_tokens: int = typer.Option(512, "--prompt-tokens", help="prompt length P"),
        context: Optional[int] = typer.Option(None, "--context", help="context C at the decode step priced (default P+128)"),
        batch: str = typer.Option("1", "--batch", help="sequences decoded together: N, auto (the planner picks "
                                  "from 1,2,4,...,32 with the placement) or sizes to pick from, e.g. 1,8,32"),
        max_latency_ms: Optional[float] = typer.Option(None, "--max-latency-ms", help="with --batch auto: "
                                                       "a step (each sequence's time per token) takes at most this"),
        max_quality_loss: Optional[float] = typer.Option(
            None, "--max-quality-loss", help="bound on the summed quality cost (relative perplexity increase, 0.01 = 1%)"),
        precisions: Optional[str] = typer.Option(None, "--precisions", help="allowed precisions, e.g. bf16,int8"),
        sensitivity: Optional[str] = typer.Option(None, "--sensitivity", help="a measured sensitivity table (JSON)"),
        reserve: Optional[str] = typer.Option(None, "--reserve", help="memory the runtime itself needs, e.g. cpu=400MB"),
        compare: bool = typer.Option(False, "--compare", help="also price the usual tools' placements"),
        as_json: bool = typer.Option(False, "--json", help="print the plan as JSON"),
        output: Optional[str] = typer.Option(None, "--output", "-o", help="write the plan JSON here"),
        kv_dtype: str = typer.Option("auto", "--kv-dtype", help=KV_HELP),
    ):
        """Plan MODEL on this machine (or a catalog machine): which device, precision and residency
        every unit gets, with predicted tok/s and memory per device."""
        import json
        import sys

        from rich.console import Console

        from hetero.errors import HeteroError
        from hetero.hardware import machine
        from hetero.model.sources import resolve_spec
        from hetero.plan import baselines, make_plan, parse_memory
        from hetero.plan.sensitivity import load_sensitivity

        if max_quality_loss is not None and not max_quality_loss >= 0:
            raise HeteroError(f"--max-quality-loss must be >= 0 (got {max_quality_loss})")
        spec = resolve_spec(model)
        hw, prof = machine(hardware)
        precs = [p.strip() for p in precisions.split(",") if p.strip()] if precisions else None
        if precs:
            from hetero.dtypes import PRECISIONS

            bad = [p for p in precs if p not in PRECISIONS]
            if bad:
                raise HeteroError(f"unknown precision {bad[0]!r}; known: {', '.join(PRECISIONS)}")
        budgets = parse_memory(memory, spec)
        table = load_sensitivity(sensitivity) if sensitivity else None
        res = parse_memory(reserve, spec) if reserve else None
        from hetero.plan.batch import parse_batches, plan_batch

        sizes = parse_batches(batch)
        kw = dict(objective=objective, prompt_tokens=prompt_tokens, context=context,
                  max_quality_loss=max_quality_loss, precisions=precs, sensitivity=table, reserve=res, kv_dtype=kv_dtype)
        if len(sizes) > 1 or batch.strip().lower() == "auto":
            p = plan_batch(spec, hw, prof, sizes, max_latency_ms=max_latency_ms, memory=budgets, **kw)
        else:
            if max_latency_ms is not None:
                raise HeteroError("--max-latency-ms bounds the batch the planner picks: give --batch auto or sizes")
            # several sequences at once run in the batch runner (hetero run/bench --batch): its step is priced
            p = make_plan(spec, hw, prof, budgets, batch=sizes[0], ragged=sizes[0] > 1, **kw)
        batch = p.batch
        others = []
        if compare:
            base_precs = [x for x in ("bf16", "int8", "int4") if not precs or x in precs] or precs
            others = baselines(spec, hw, prof, budgets, objective=objective, prompt_tokens=prompt_tokens,
                               context=context, batch=batch, precision=base_precs, reserve=res)
        if output:
            p.save(output)
        if as_json:
            d = p.to_dict()
            if compare:
                d["baselines"] = [b.to_dict() for b in others]
            sys.stdout.write(json.dumps(d, indent=2) + "\n")
            return
        console = Console(width=None if sys.stdout.isatty() else 120)
        console.print(p.explain(others or None))
        if output:
            console.print(f"plan written to {output}")
