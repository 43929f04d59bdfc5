"""`hetero pipeline`: generate with a model split into stages over several ranks (processes / hosts);
`hetero dist-plan`: the what-if — the stage split and predicted tok/s over catalog hosts and links."""
from __future__ import annotations

import json
import shlex
from typing import List, Optional

import typer


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _hosts(hosts_file: Optional[str], ranks: Optional[int]):
    from hetero.dist.hosts import load_hosts, local_hosts
    from hetero.errors import HeteroError

    if hosts_file and ranks:
        raise HeteroError("give --hosts or --ranks, not both")
    if hosts_file:
        return load_hosts(hosts_file)
    if ranks is None or ranks < 1:
        raise HeteroError("give --hosts hosts.yaml, or --ranks N for N processes on this machine")
    return local_hosts(ranks)


def _layers(text: Optional[str]) -> Optional[list[int]]:
    from hetero.errors import HeteroError

    if not text:
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise HeteroError(f"--layers takes counts like 16,14, got {text!r}") from None


def _units(s) -> str:
    """embed, layers 0-10 / layers 11-21 / layers 22-31, head"""
    ids = [int(u.split(".")[1]) for u in s.units if u.startswith("layers.")]
    parts = (["embed"] if "embed" in s.units else []) + ([f"L{ids[0]}-{ids[-1]}"] if ids else [])
    return "+".join(parts + (["head"] if "head" in s.units else []))


def _console():
    from rich.console import Console

    c = Console()
    return c if c.is_terminal else Console(width=130)


def _split_table(split, title: str):
    from rich.table import Table

    t = Table(title=title)
    for c in ("rank", "host", "device", "units", "layers", "weights", "KV", "budget", "step ms", "send ms"):
        t.add_column(c, justify="right" if c not in ("host", "device", "units") else "left")
    for s in split.stages:
        t.add_row(str(s.rank), s.host, s.device, _units(s), str(s.layers), _gb(s.weight_bytes),
                  _gb(s.kv_bytes), _gb(s.memory_budget), f"{s.step_s * 1e3:.2f}", f"{s.send_s * 1e3:.3f}")
    return t


def register(app: typer.Typer) -> None:
    @app.command()
    def pipeline(
        model: Optional[str] = typer.Argument(None, help="A .gguf file, an HF dir, `smollm2-135m` (default) or `synthetic:NAME`."),
        hosts_file: Optional[str] = typer.Option(None, "--hosts", help="The hosts file (YAML)."),
        ranks: Optional[int] = typer.Option(None, "--ranks", help="Instead of --hosts: N ranks on this machine."),
        prompt: List[str] = typer.Option(["What is the capital of France?"], "-p", "--prompt", help="A prompt; repeat for several sequences."),
        sequences: int = typer.Option(1, "--sequences", help="Run each prompt this many times (sequences in flight)."),
        max_new_tokens: int = typer.Option(32, "-n", "--max-new-tokens"),
        micro_batch: int = typer.Option(1, "--micro-batch", help="Sequences per micro-batch (equal prompt lengths)."),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="Shorthand for --precisions DTYPE (fp32 | bf16 | int8 | int4)."),
        precisions: Optional[str] = typer.Option(None, "--precisions", help="Precisions the planner may use per unit, e.g. bf16,int8 (default: as `hetero run`)."),
        memory: Optional[str] = typer.Option(None, "--memory", help="Every rank's own budgets, as `hetero run --memory`, e.g. cpu=800MB (a rank streams from disk what it cannot hold)."),
        objective: str = typer.Option("decode", "--objective", help="decode (default) | ttft | throughput."),
        layers: Optional[str] = typer.Option(None, "--layers", help="Decoder layers per stage, e.g. 16,14 (default: the cost-model split)."),
        timeout: float = typer.Option(30.0, "--timeout", help="Seconds before a silent rank ends the run."),
        threads: Optional[int] = typer.Option(None, "--threads", help="Threads per rank (default: cores / ranks)."),
        chat: Optional[bool] = typer.Option(None, "--chat/--no-chat"),
        print_torchrun: bool = typer.Option(False, "--print-torchrun", help="Print the torchrun line for each host and exit."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
    ) -> None:
        """Generate with MODEL split into pipeline stages, one per rank (greedy by default)."""
        from hetero.dist import generate
        from hetero.dist.launch import torchrun_commands
        from hetero.dist.pipeline import precision_list
        from hetero.errors import HeteroError

        if sequences < 1 or micro_batch < 1 or max_new_tokens < 1:
            raise HeteroError("--sequences, --micro-batch and --max-new-tokens must be ≥ 1")
        h = _hosts(hosts_file, ranks)
        if print_torchrun or not h.all_local():
            if not hosts_file:
                raise HeteroError("--print-torchrun needs --hosts")
            plan_args = [f"--{k} {shlex.quote(v)}" for k, v in (("precisions", precisions), ("dtype", dtype), ("memory", memory)) if v]
            extra = " ".join([*(f"-p {shlex.quote(p)}" for p in prompt), f"-n {max_new_tokens}", *plan_args,
                              f"--objective {shlex.quote(objective)}"])
            for line in torchrun_commands(model or "smollm2-135m", h, hosts_file, extra):
                print(line)
            if not print_torchrun:
                raise HeteroError("hosts other than this one: run the torchrun line above on each host")
            return
        from hetero.model.sources import resolve_spec

        units = len(resolve_spec(model).unit_names())
        if h.world_size > units:
            raise HeteroError(f"{h.world_size} ranks but the model has only {units} units to split; "
                              f"use at most {units} ranks")
        res = generate(model, h, [p for p in prompt for _ in range(sequences)], max_new_tokens, timeout=timeout,
                       threads=threads, micro_batch=micro_batch, precisions=precision_list(precisions, dtype),
                       memory=memory, objective=objective, layers=_layers(layers), chat=chat)
        if as_json:
            print(json.dumps(res, indent=1))
            return
        _print(res)

    @app.command("dist-plan")
    def dist_plan(
        model: Optional[str] = typer.Argument(None, help="Model (only its headers are read)."),
        hosts_file: Optional[str] = typer.Option(None, "--hosts", help="A hosts file (its `hardware:` entries)."),
        hardware: Optional[str] = typer.Option(None, "--hardware", help="Comma-separated catalog machines, one rank each, e.g. desktop,desktop,rtx4090."),
        link: str = typer.Option("10gbe,100gbe", "--link", help="With --hardware: links to compare (catalog names or rates)."),
        dtype: str = typer.Option("bf16", "--dtype"),
        prompt_tokens: int = typer.Option(512, "--prompt-tokens"),
        context: int = typer.Option(1024, "--context"),
        micro_batch: int = typer.Option(1, "--micro-batch"),
        in_flight: Optional[int] = typer.Option(None, "--in-flight", help="Micro-batches in flight (default: one per stage)."),
        as_json: bool = typer.Option(False, "--json"),
    ) -> None:
        """What-if: the stage split of MODEL over several hosts and its predicted tok/s (no weights read)."""
        from hetero.dist.hosts import catalog_hosts, load_hosts
        from hetero.dist.split import rank_speeds, split_model
        from hetero.errors import HeteroError
        from hetero.model.sources import resolve_spec

        spec = resolve_spec(model)
        if bool(hosts_file) == bool(hardware):
            raise HeteroError("give --hosts FILE or --hardware a,b,... (catalog machines)")
        if hosts_file:
            cases = [("hosts file", load_hosts(hosts_file))]
        else:
            names = [x.strip() for x in hardware.split(",") if x.strip()]
            cases = [(ln, catalog_hosts(names, ln)) for ln in link.split(",") if ln]
        out, console = [], _console()
        for label, h in cases:
            m = in_flight or h.world_size
            s = split_model(spec, h, rank_speeds(h), dtype, micro_batch, m, prompt_tokens, context)
            p = s.predict()
            out.append({"link": label, "hosts": [x.hardware for x in h.hosts], **s.to_dict()})
            if not as_json:
                console.print(_split_table(s, f"{spec.name} {dtype} over {h.world_size} ranks, link {label}"))
                console.print(f"  predicted: decode {p['decode_tok_s']:.2f} tok/s (one sequence), "
                              f"{p['throughput_tok_s']:.2f} tok/s with {m} micro-batches of {micro_batch} in flight, "
                              f"prefill {p['prefill_tok_s']:.0f} tok/s ({prompt_tokens} tokens)\n")
        if as_json:
            print(json.dumps(out, indent=1))


def _print(res: dict) -> None:
    from rich.table import Table

    c = _console()
    for i, s in enumerate(res["sequences"]):
        c.print(f"[bold]sequence {i}[/bold] ({s['prompt_tokens']} prompt tokens, {len(s['token_ids'])} generated, "
                f"{s['finish_reason']}):", highlight=False)
        print(s["text"])
    t = Table(title="ranks")
    for col in ("rank", "units", "layers", "choices", "streamed", "weights held", "peak (cpu)", "budget (cpu)",
                "load s", "busy %"):
        t.add_column(col, justify="left" if col in ("units", "choices") else "right")
    for r in res["ranks"]:
        t.add_row(str(r["rank"]), r["units"], str(r["layers"]), ", ".join(r["choices"]), str(len(r["streamed_units"])),
                  _gb(r["weight_bytes"]), _gb(r["footprint_bytes"].get("cpu", 0)),
                  _gb(r["budget_bytes"].get("cpu", 0)), f"{r['load_s']:.1f}",
                  f"{100 * r['compute_s'] / max(res['wall_s'], 1e-9):.0f}")
    c.print(t)
    for r in res["ranks"]:
        for d, x in r["over_budget"].items():
            c.print(f"[yellow]warning:[/yellow] rank {r['rank']} {d} footprint {_gb(x['measured'])} is over its "
                    f"budget of {_gb(x['budget'])}", highlight=False)
    pred = res["split"]["predicted"]
    c.print(f"{res['generated_tokens']} tokens in {res['wall_s']:.2f} s: {res['tok_s']:.1f} tok/s overall, "
            f"decode {res['decode_tok_s']:.1f} tok/s measured vs {pred['throughput_tok_s']:.1f} predicted "
            f"({res['micro_batches']} micro-batches over {res['world']} ranks)", highlight=False)
