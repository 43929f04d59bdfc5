"""`hetero serve`: the OpenAI-compatible HTTP API over the planned engine, planned as `hetero run` plans."""
from __future__ import annotations

import sys
from typing import Any, Optional

import typer

from hetero.commands.model import KV_HELP
from hetero.errors import HeteroError


def load_engine(model: Optional[str], plan_file: Optional[str] = None, memory: Optional[str] = None,
                hardware: Optional[str] = None, objective: str = "decode", precisions: Optional[str] = None,
                context: Optional[int] = None, prefetch: Optional[bool] = None, replan: bool = True,
                threads: Optional[int] = None, progress: bool = True,
                max_quality_loss: Optional[float] = None, kv_dtype: Optional[str] = None) -> tuple[Any, list[str]]:
    """Plan MODEL (or check --plan FILE) as `hetero run` does, then load the runtime Engine for it.

    The server's own modules are imported first, so the runtime baseline the planner reserves
    (measured in this process) includes them. Without --context the plan covers the model's context:
    a server takes prompts of any length up to it.
    """
    import torch

    import fastapi  # noqa: F401  (imported for the baseline: the serving process holds them)
    import uvicorn  # noqa: F401

    import hetero.serve.app  # noqa: F401
    from hetero.model.sources import resolve_spec
    from hetero.runtime import engine as eng
    from hetero.runtime.memory import Footprint

    if threads:
        torch.set_num_threads(threads)
    if context is not None and context < 2:
        raise HeteroError(f"--context must be at least 2, got {context}")
    mon = Footprint().start()  # from before the weights, so the peak covers loading too
    precs = [p.strip() for p in precisions.split(",") if p.strip()] if precisions else None
    ctx = context or resolve_spec(model).max_context
    plan, notes = eng.plan_for_run(model, plan_file, memory, hardware, objective, precs, prompt_tokens=64,
                                   context=ctx, replan=replan, max_quality_loss=max_quality_loss,
                                   kv_dtype=kv_dtype)
    return eng.Engine.load(plan, model, prefetch=prefetch, progress=progress, monitor=mon), notes


def serve(
    model: Optional[str] = typer.Argument(None, help="A .gguf file, an HF dir, `smollm2-135m` (default) or `synthetic:NAME`."),
    plan_file: Optional[str] = typer.Option(None, "--plan", help="Serve this plan (JSON from `hetero plan -o`)."),
    memory: Optional[str] = typer.Option(None, "--memory", help="Plan for these budgets, e.g. cpu=2GB,disk=50GB or cpu=25% (of the bf16 size); the whole process must fit."),
    hardware: Optional[str] = typer.Option(None, "--hardware", help="Plan with this hardware: this (default) | catalog:SPEC | FILE."),
    objective: Optional[str] = typer.Option(None, "--objective", help="decode (default) | ttft | throughput."),
    precisions: Optional[str] = typer.Option(None, "--precisions", help="Precisions the planner may use, e.g. bf16,int8."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Shorthand for --precisions DTYPE: every unit at DTYPE."),
    max_quality_loss: Optional[float] = typer.Option(None, "--max-quality-loss", help="Keep the summed quality cost within Q (relative perplexity increase; default 0.01 = +1% unless --precisions or --dtype is given; a quantised file runs as stored)."),
    context: Optional[int] = typer.Option(None, "--context", help="Tokens per request (prompt + reply) to plan the KV cache for (default: the model's context)."),
    prefetch: Optional[bool] = typer.Option(None, "--prefetch/--no-prefetch", help="Overlap streamed units' reads with compute (default: as the plan says)."),
    replan: bool = typer.Option(True, "--replan/--no-replan", help="Re-plan a --plan that no longer fits free RAM (else fail)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="HETERO_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on every route but /health."),
    max_concurrency: int = typer.Option(8, "--max-concurrency", help="Generations run at once (the batch size, when batching)."),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests that may wait beyond those; more get 429."),
    max_body_bytes: int = typer.Option(1 << 20, "--max-body-bytes", help="Largest request body accepted (413 past it)."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="The model id clients send (default: the model's name)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for the engine (default: torch's)."),
    batching: Optional[bool] = typer.Option(None, "--batching/--no-batching", help="Continuous batching: requests share each forward step (default: wherever the architecture supports it; else they are interleaved)."),
    kv_memory: Optional[str] = typer.Option(None, "--kv-memory", help="The batch's KV pool, e.g. 512MB (default: the plan's KV plus half its headroom, up to --max-concurrency whole contexts)."),
    prefill_chunk: int = typer.Option(512, "--prefill-chunk", help="Prompt tokens a batched step prefills with nothing else decoding (a long prompt takes several steps)."),
    prefill_stall: float = typer.Option(0.6, "--prefill-stall", help="Beside decoding streams, a prefill chunk costs about this many of their steps (sized from timed steps; 0: always --prefill-chunk, which also keeps greedy output bit for bit what a request gets alone)."),
    prefix_cache: bool = typer.Option(True, "--prefix-cache/--no-prefix-cache", help="Keep whole 16-token blocks of prompts in the KV pool and share them with later prompts that start the same (a system prompt, a repeated prompt): those tokens are not prefilled again. A request served from the cache rounds like one whose prompt was cut where its cached part ends."),
    log_level: str = typer.Option("warning", "--log-level", help="uvicorn log level."),
    kv_dtype: Optional[str] = typer.Option(None, "--kv-dtype", help=KV_HELP),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="Apply this LoRA adapter dir (PEFT format) as a side path on the base."),
) -> None:
    """Serve MODEL over the OpenAI API: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics,
    /plan (the Plan served) and /report (predicted vs measured).

    MODEL is planned exactly as `hetero run` plans it (same flags and defaults) and served by the same engine.
    """
    if not 0 < port < 65536:
        raise HeteroError(f"--port must be in 1..65535, got {port}")
    if max_concurrency < 1 or max_queue < 0:
        raise HeteroError("--max-concurrency must be ≥ 1 and --max-queue ≥ 0")
    if max_body_bytes < 1024:
        raise HeteroError(f"--max-body-bytes must be at least 1024, got {max_body_bytes}")
    if prefill_chunk < 1:
        raise HeteroError(f"--prefill-chunk must be ≥ 1, got {prefill_chunk}")
    if prefill_stall < 0:
        raise HeteroError(f"--prefill-stall must be ≥ 0, got {prefill_stall}")
    if dtype and precisions:
        raise HeteroError("give --dtype or --precisions, not both (--dtype D is --precisions D)")
    if max_quality_loss is not None and not max_quality_loss >= 0:
        raise HeteroError(f"--max-quality-loss must be >= 0 (got {max_quality_loss})")
    _check_port(host, port)
    if adapter:  # a wrong adapter fails before the model loads
        from hetero.finetune.adapter_io import load_adapter
        from hetero.model.sources import resolve_spec

        load_adapter(adapter, resolve_spec(model))
    import uvicorn

    from hetero.plan.units import fmt_bytes, parse_bytes
    from hetero.runtime.engine import summary
    from hetero.serve.app import create_app

    kv_bytes = parse_bytes(kv_memory) if kv_memory else None
    e, notes = load_engine(model, plan_file, memory, hardware, objective or "decode", precisions or dtype,
                           context, prefetch, replan, threads, max_quality_loss=max_quality_loss,
                           kv_dtype=kv_dtype)
    try:
        if adapter:
            from hetero.finetune.adapter_io import apply_adapter

            apply_adapter(e.model.net, e.model.spec, adapter)
        for n in notes:
            print(f"note: {n}", file=sys.stderr)
        print(summary(e.plan), file=sys.stderr)
        app = create_app(e, model_id=model_name, aliases=(model,) if model else (), api_key=api_key,
                         max_concurrency=max_concurrency, max_queue=max_queue, max_body_bytes=max_body_bytes,
                         batching=batching, kv_bytes=kv_bytes, prefill_chunk=prefill_chunk,
                         prefill_stall=prefill_stall, prefix_cache=prefix_cache)
        runner = getattr(app.state.scheduler, "runner", None)
        mode = (f"batching, KV pool {runner.pool.n_blocks} blocks of {runner.pool.block} tokens "
                f"({fmt_bytes(runner.pool.nbytes())}){', prefix cache' if runner.pool.prefix_cache else ''}"
                if runner is not None else "interleaved")
        print(f"serving {app.state.model_id} at http://{host}:{port}/v1  [context {app.state.serve.context}, "
              f"max concurrency {max_concurrency}, queue {max_queue}, {mode}"
              f"{', API key required' if api_key else ''}]", file=sys.stderr, flush=True)
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        e.close()


def _check_port(host: str, port: int) -> None:
    """Fail in one line before loading the model if the address cannot be bound (uvicorn would exit 1)."""
    import socket

    try:
        with socket.create_server((host, port), reuse_port=False) as s:
            s.close()
    except OSError as e:
        raise HeteroError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None


def register(app: typer.Typer) -> None:
    app.command()(serve)
