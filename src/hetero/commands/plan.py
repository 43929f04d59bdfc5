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
        batch: int = typer.Option(1, "--batch", help="sequences decoded together"),
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
        p = make_plan(spec, hw, prof, budgets, objective=objective, prompt_tokens=prompt_tokens,
                      context=context, batch=batch, max_quality_loss=max_quality_loss, precisions=precs,
                      sensitivity=table, reserve=res, kv_dtype=kv_dtype)
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
