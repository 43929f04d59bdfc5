"""`hetero run` and `hetero info`: generate with a model, or describe it without loading weights."""
from __future__ import annotations

import itertools
import json
import sys
from typing import Optional

import typer

DEFAULT_PROMPT = "What is the capital of France?"


KV_HELP = ("How the KV cache is stored: auto (the layers' dtype: bf16, fp32 for fp32 weights) | bf16 | fp32 | "
           "int8 (per token and head, ~half of bf16's bytes: ~2x the context or sequences in a budget; "
           "decodes layer by layer, not in the compiled stack).")


def peak_rss_bytes() -> int:
    from hetero.runtime.memory import peak_rss_bytes as peak

    return peak()


def _consume(records, echo: bool):
    """Drain a stream of Records: (generated ids, text pieces, last record), echoing text as it comes."""
    ids: list[int] = []
    text: list[str] = []
    last = None
    for rec in records:
        ids += rec.token_ids
        text.append(rec.text)
        last = rec
        if echo:
            sys.stdout.write(rec.text)
            sys.stdout.flush()
    return ids, text, last


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def run(
    model: Optional[str] = typer.Argument(None, help="A .gguf file, an HF dir, `smollm2-135m` (default) or `synthetic:NAME`."),
    prompt: str = typer.Option(DEFAULT_PROMPT, "-p", "--prompt", help="The prompt."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy (the default, so runs reproduce)."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (1 = off)."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="1 = off."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for sampling."),
    chat: Optional[bool] = typer.Option(None, "--chat/--no-chat", help="Wrap the prompt in the chat template (default: when the model has one)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32 | bf16 | int8 | int4 for every unit (shorthand for --precisions DTYPE)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: torch's)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming text."),
    plan_file: Optional[str] = typer.Option(None, "--plan", help="Run this plan (JSON from `hetero plan -o`)."),
    memory: Optional[str] = typer.Option(None, "--memory", help="Plan for these budgets first, e.g. cpu=2GB,disk=50GB or cpu=25% (of the bf16 size); the whole process must fit."),
    hardware: Optional[str] = typer.Option(None, "--hardware", help="Plan with this hardware: this (default) | catalog:SPEC | FILE."),
    objective: Optional[str] = typer.Option(None, "--objective", help="decode (default) | ttft | throughput."),
    precisions: Optional[str] = typer.Option(None, "--precisions", help="Precisions the planner may use, e.g. bf16,int8."),
    max_quality_loss: Optional[float] = typer.Option(None, "--max-quality-loss", help="Keep the summed quality cost within Q (relative perplexity increase; default 0.01 = +1% unless --precisions or --dtype is given; a quantised file runs as stored)."),
    context: Optional[int] = typer.Option(None, "--context", help="Context length to plan the KV cache for (default: prompt + max new tokens)."),
    prefetch: Optional[bool] = typer.Option(None, "--prefetch/--no-prefetch", help="Overlap streamed units' reads with compute (default: as the plan says)."),
    replan: bool = typer.Option(True, "--replan/--no-replan", help="Re-plan a --plan that no longer fits free RAM (else fail)."),
    batch: Optional[str] = typer.Option(None, "--batch", help="Decode B sequences per forward: the prompt repeated B times, or at most B of --prompts at once; auto: the planner picks B with the placement (with --prompts)."),
    prompts_file: Optional[str] = typer.Option(None, "--prompts", help="A file of prompts, one per line, run as one batch (with --batch B: B at a time)."),
    kv_dtype: Optional[str] = typer.Option(None, "--kv-dtype", help=KV_HELP),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="Apply this LoRA adapter dir (PEFT format, e.g. from `hetero finetune`) as a side path on the base."),
) -> None:
    """Generate text from PROMPT, streaming it to stdout, and end with predicted vs measured speed.

    Every run is planned (placement, precision, residency per unit) as `hetero serve` and `hetero bench`
    plan: by the planner within the budgets (--memory; default: the RAM free now), or --plan FILE.
    """
    from hetero.errors import HeteroError

    if threads is not None and not 1 <= threads <= 4096:
        raise HeteroError(f"--threads must be between 1 and 4096 (got {threads})")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # undecodable argv bytes arrive as lone surrogates
        raise HeteroError("the prompt is not valid UTF-8 text") from None
    if max_new_tokens < 0:
        raise HeteroError(f"--max-new-tokens must be >= 0 (got {max_new_tokens})")
    if max_quality_loss is not None and not max_quality_loss >= 0:
        raise HeteroError(f"--max-quality-loss must be >= 0 (got {max_quality_loss})")
    if dtype is not None:
        if precisions:
            raise HeteroError("give --dtype or --precisions, not both (--dtype D is --precisions D)")
        if dtype not in ("fp32", "bf16", "fp16", "int8", "int4"):
            raise HeteroError(f"unknown --dtype {dtype!r}; known: fp32, bf16, fp16, int8, int4")
        precisions = dtype
    many = None
    if batch is not None or prompts_file is not None:
        from hetero.commands.run_batch import read_prompts

        auto = batch is not None and batch.strip().lower() == "auto"
        if auto and not prompts_file:
            raise HeteroError("--batch auto picks how many of --prompts run at once: give --prompts FILE")
        if batch is not None and not auto:
            try:
                batch = int(batch)
            except ValueError:
                raise HeteroError(f"--batch takes a size or auto (got {batch!r})") from None
            if not 1 <= batch <= 256:
                raise HeteroError(f"--batch must be between 1 and 256 (got {batch})")
        if max_new_tokens < 1:
            raise HeteroError("--batch and --prompts generate at least 1 token: give --max-new-tokens >= 1")
        prompts = read_prompts(prompts_file) if prompts_file else [prompt] * batch
        # auto: the plan's batch (plan/batch.py), among sizes up to the number of prompts
        many = (prompts, "auto" if auto else (batch or len(prompts)))
    _planned_run(model, prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, chat,
                 threads, as_json, plan_file, memory, hardware, objective or "decode", precisions, context,
                 prefetch, replan, many, max_quality_loss, kv_dtype, adapter)


def info(
    model: Optional[str] = typer.Argument(None, help="A .gguf file, an HF dir, `smollm2-135m` (default) or `synthetic:NAME`."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Describe MODEL from its headers alone: shape, parameters, bytes per precision, a layer table."""
    import hetero

    spec = hetero.spec(model)
    per_precision = {p: spec.total_bytes(p) for p in spec.runnable_precisions()}
    units = [
        {"unit": u, "params": spec.unit_params(u), "stored_bytes": spec.unit_stored_bytes(u),
         "bf16_bytes": spec.unit_bytes(u, "bf16"), "decode_flops": spec.unit_flops_per_token(u, 1),
         # a MoE layer's routed experts are the unit layers.i.experts (all of its bf16_bytes)
         **({"expert_bf16_bytes": spec.unit_expert_bytes(u, "bf16")} if spec.is_moe else {})}
        for u in spec.unit_names()
    ]
    if as_json:
        print(json.dumps({**spec.summary(), "bytes": per_precision,
                          "kv_bytes_per_token_bf16": spec.kv_bytes_per_token("bf16"),
                          "kv_bytes_full_context_bf16": spec.kv_bytes(spec.max_context, "bf16"), "units": units}))
        return
    from rich.console import Console
    from rich.table import Table

    c = Console()
    s = spec.summary()
    c.print(f"[bold]{s['name']}[/bold]  ({s['architecture']}, {s['format']})  {spec.n_params / 1e6:,.1f}M parameters")
    c.print(f"layers {s['layers']}, hidden {s['hidden']}, ffn {s['ffn']}, heads {s['heads']}/{s['kv_heads']} kv, "
            f"head dim {s['head_dim']}, vocab {s['vocab']}, context {s['context']}, rope θ {s['rope_theta']:g}"
            f"{', scaling ' + s['rope_scaling']['type'] if s['rope_scaling'] else ''}, "
            f"tied embeddings {s['tied_embeddings']}, qkv bias {s['attention_bias']}")
    c.print("stored " + _fmt_bytes(spec.stored_bytes) + " | " +
            ", ".join(f"{p} {_fmt_bytes(b)}" for p, b in per_precision.items()) +
            f" | KV cache {_fmt_bytes(spec.kv_bytes_per_token('bf16'))}/token (bf16)"
            + (f", {_fmt_bytes(spec.kv_bytes(spec.max_context, 'bf16'))} at the full context: "
               f"{s['local_layers']} local layers hold {spec.sliding_window} tokens at most" if spec.layer_types else ""))
    if spec.layer_types:
        c.print(f"attention: {s['local_layers']} local layers (window {spec.sliding_window}, rope θ "
                f"{spec.rope_local_theta:g}), {spec.n_layers - s['local_layers']} global")
    if spec.is_moe:
        experts = spec.unit_expert_bytes("layers.0", "bf16")
        active = spec.n_layers * spec.layer_matmul_params() + spec.hidden_size * spec.vocab_size
        c.print(f"experts: {spec.n_experts} routed per layer (FFN {spec.expert_ffn}), {spec.experts_per_token} per token"
                f"{', renormalised' if spec.norm_topk_prob or spec.architecture == 'mixtral' else ''}"
                + (f", a shared expert (FFN {spec.shared_expert_ffn})" if spec.shared_expert_ffn else "")
                + f"; {active / 1e9:,.2f}B matrix parameters per token; layer 0 (bf16): routed experts "
                f"{_fmt_bytes(experts)}, dense part {_fmt_bytes(spec.unit_bytes('layers.0', 'bf16') - experts)}")
    t = Table("unit", "params", "stored", "bf16", "decode FLOPs/token")
    rows = units if len(units) <= 12 else units[:5] + [None] + units[-4:]
    for u in rows:
        if u is None:
            t.add_row("…", "", "", "", "")
            continue
        t.add_row(u["unit"], f"{u['params'] / 1e6:,.2f}M", _fmt_bytes(u["stored_bytes"]),
                  _fmt_bytes(u["bf16_bytes"]), f"{u['decode_flops'] / 1e6:,.1f}M")
    c.print(t)


def _planned_run(model, prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, chat,
                 threads, as_json, plan_file, memory, hardware, objective, precisions, context, prefetch,
                 replan, many=None, max_quality_loss=None, kv_dtype=None, adapter=None) -> None:
    """`run` under a Plan: plan (or load and check one), build, generate, predicted vs measured."""
    from hetero.runtime import firstuse

    if not plan_file:  # before torch loads: a budget too small for the runtime is refused under it
        firstuse.prepare(model)
        firstuse.refuse_early(model, memory)
    import torch

    from hetero.errors import HeteroError
    from hetero.runtime import engine as eng
    from hetero.runtime.memory import Footprint

    if threads:
        torch.set_num_threads(threads)
    mon = Footprint().start()  # from before the weights, so the peak covers loading too
    precs = [p.strip() for p in precisions.split(",") if p.strip()] if precisions else None
    if context is not None and context < 2:
        raise HeteroError(f"--context must be at least 2, got {context}")
    if adapter:  # a wrong adapter fails before anything loads
        from hetero.finetune.adapter_io import load_adapter
        from hetero.model.sources import resolve_spec

        load_adapter(adapter, resolve_spec(model))
    plan_batch = 1
    if many is not None and not plan_file:
        if many[1] == "auto":
            from hetero.plan.batch import auto_sizes

            plan_batch = auto_sizes(len(many[0]))
        else:
            plan_batch = min(many[1], len(many[0]))
    plan, notes = eng.plan_for_run(model, plan_file, memory, hardware, objective, precs,
                                   prompt_tokens=64, context=context or (64 + max_new_tokens), replan=replan,
                                   max_quality_loss=max_quality_loss, kv_dtype=kv_dtype, batch=plan_batch)
    if many is not None and many[1] == "auto":
        many = (many[0], plan.batch)
        notes.append(f"batch {plan.batch} (the plan's: " + (plan.why.notes[0] if plan.batch_options else
                                                             "a --plan's own batch") + ")")
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    e = eng.Engine.load(plan, model, prefetch=prefetch, progress=not as_json, monitor=mon)
    if adapter:
        from hetero.finetune.adapter_io import apply_adapter

        apply_adapter(e.model.net, e.model.spec, adapter)
    if many is not None:  # several sequences per forward (commands/run_batch.py)
        from hetero.commands.run_batch import run_batch
        from hetero.runtime.sampling import SamplingParams

        try:
            if not as_json:
                print(eng.summary(plan), file=sys.stderr)
            run_batch(e, many[0], many[1], max_new_tokens,
                      SamplingParams(temperature, top_k, top_p, repetition_penalty, seed), chat, as_json)
        finally:
            e.close()
        return
    try:
        records = e.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, repetition_penalty=repetition_penalty, seed=seed, chat=chat)
        first = next(records)  # a prompt the model cannot take fails here, before anything is printed
        if not as_json:
            print(eng.summary(plan), file=sys.stderr)
        ids, text, last = _consume(itertools.chain([first], records), echo=not as_json)
        rep = e.report()
        over = e.over_budget()
    finally:
        e.close()
    precs_used = sorted({u.precision for u in plan.units})
    result = {
        "model": e.model.spec.name, "dtype": precs_used[0] if len(precs_used) == 1 else "mixed",
        "text": "".join(text), "token_ids": ids,
        "prompt_tokens": last.prompt_tokens, "generated_tokens": last.generated_tokens,
        "prefill_tok_s": round(last.prefill_tok_s, 2), "decode_tok_s": round(last.decode_tok_s, 2),
        "finish_reason": last.finish_reason, "peak_rss_bytes": peak_rss_bytes(),
        "load_s": round(e.model.load_s, 3),
        **{k: rep[k] for k in ("budget_bytes", "predicted", "measured")},
        "streaming": rep["streaming"], "notes": notes,
        "over_budget": {d: {"measured": m, "budget": b} for d, (m, b) in over.items()},
        "plan": plan.to_dict(),
    }
    for d, (m, b) in over.items():
        print(f"warning: {d} footprint {_fmt_bytes(m)} is over its budget of {_fmt_bytes(b)}", file=sys.stderr)
    if as_json:
        print(json.dumps(result))
        return
    print()
    pr, me = rep["predicted"], rep["measured"]
    devs = sorted(set(pr["footprint_bytes"]) | set(me["footprint_bytes"]))
    print(f"[{result['prompt_tokens']} prompt tokens, {result['generated_tokens']} generated | "
          f"finish: {result['finish_reason']}]", file=sys.stderr)
    print(f"{'':10}{'prefill tok/s':>15}{'decode tok/s':>15}  footprint", file=sys.stderr)
    for name, r in (("predicted", pr), ("measured", me)):
        fp = ", ".join(f"{d} {_fmt_bytes(r['footprint_bytes'][d])}" for d in devs if d in r["footprint_bytes"])
        print(f"{name:10}{r['prefill_tok_s']:>15.1f}{r['decode_tok_s']:>15.2f}  {fp}", file=sys.stderr)
    print("budget    " + ", ".join(f"{d} {_fmt_bytes(b)}" for d, b in rep["budget_bytes"].items()), file=sys.stderr)


def register(app: typer.Typer) -> None:
    app.command()(run)
    app.command()(info)
