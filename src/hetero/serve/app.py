"""The OpenAI-compatible HTTP API: `create_app(engine)` returns a FastAPI app serving a loaded
runtime Engine (`Engine.load(plan, model)`), the one `hetero run` generates with.

Routes live on routers (routes/openai.py, routes/ops.py); what they share is one ServeState on
`app.state.serve`, handed to each handler by the `get_state` dependency.
"""
from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from hetero.serve.limits import BODY_IDLE_S, RequestLimits
from hetero.serve.batched import PREFILL_CHUNK, PREFILL_STALL, BatchScheduler, can_batch
from hetero.serve.budget import BudgetWatch
from hetero.runtime.omp import release_pool
from hetero.serve.errors import install_error_handlers
from hetero.serve.gauges import register_gauges
from hetero.serve.metrics import Metrics
from hetero.serve.middleware import ServeMiddleware
from hetero.serve.routes import openai, ops
from hetero.serve.scheduler import Job, Scheduler
from hetero.serve.state import ServeState

DEFAULT_MAX_BODY = 1 << 20       # 1 MiB: far above any prompt that fits a context


def create_app(engine: Any, model_id: str | None = None, aliases: tuple[str, ...] = (), api_key: str | None = None,
               max_concurrency: int = 8, max_queue: int = 64, max_body_bytes: int = DEFAULT_MAX_BODY,
               watch: BudgetWatch | None = None, body_idle_s: float = BODY_IDLE_S, batching: bool | None = None,
               kv_bytes: int | None = None, prefill_chunk: int = PREFILL_CHUNK,
               prefill_stall: float = PREFILL_STALL, prefix_cache: bool = False) -> FastAPI:
    """batching: continuous batching (serve.batched) or interleaved single sequences (serve.scheduler);
    None picks batching wherever the architecture takes ragged steps. kv_bytes: the batch's KV pool
    (None: sized from the plan, serve.kvsize); prefill_chunk: prompt tokens a batched step takes;
    prefill_stall: beside decoding streams, a chunk costs about this many of their steps (0: always
    prefill_chunk, and greedy output bit for bit a request's alone: runtime.batch); prefix_cache:
    whole prompt blocks are kept and shared by later prompts that start the same (runtime.kvcache)."""
    spec = engine.model.spec
    model_id = model_id or spec.name
    metrics = Metrics()
    watch = watch or BudgetWatch(engine)

    def on_token(job: Job, now: float) -> None:
        if job.priority:
            return
        if job.t_first is None:
            metrics.observe("hetero_time_to_first_token_seconds", now - job.t_submit)
            metrics.observe("hetero_queue_wait_seconds", (job.t_start or now) - job.t_submit)
        else:
            metrics.observe("hetero_inter_token_latency_seconds", now - job.t_last)

    def on_done(job: Job, outcome: str) -> None:
        watch.check()  # each generation's KV cache and activations are where a budget breaks
        if job.priority:
            return
        metrics.inc("hetero_generations_total", outcome=outcome)
        metrics.inc("hetero_generated_tokens_total", job.tokens)
        metrics.inc("hetero_prompt_tokens_total", job.prompt_tokens)

    def on_step(runner, seconds: float) -> None:
        metrics.inc("hetero_batch_steps_total")
        metrics.inc("hetero_batch_decode_rows_total", runner.last_decode_rows)
        metrics.inc("hetero_batch_prefill_tokens_total", runner.last_prefill_tokens)
        metrics.observe("hetero_batch_step_seconds", seconds)

    # The plan's context bounds each request: its KV cache is what the plan budgeted.
    context = min(spec.max_context, engine.plan.context)
    if batching is None:
        batching = can_batch(engine)
    if batching:
        scheduler: Scheduler = BatchScheduler(engine, max_concurrency, max_queue, on_token, on_done, on_step,
                                              kv_bytes=kv_bytes, context=context, prefill_tokens=prefill_chunk,
                                              stall=prefill_stall, prefix_cache=prefix_cache)
    else:
        scheduler = Scheduler(engine, max_concurrency, max_queue, on_token, on_done)
    register_gauges(metrics, scheduler, engine, watch)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # the event loop's thread computes nothing from here on (the scheduler's worker does): its
        # OpenMP workers, if loading the model made them, would halve the worker's step (runtime/omp.py)
        release_pool()
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="hetero", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = ServeState(engine=engine, scheduler=scheduler, metrics=metrics, model_id=model_id,
                                 known={model_id, spec.name, *[a for a in aliases if a]}, context=context,
                                 max_body_bytes=max_body_bytes, watch=watch)
    app.state.scheduler, app.state.metrics, app.state.model_id = scheduler, metrics, model_id
    # added first, so it runs inside ServeMiddleware: metrics count its 401s and 408s too
    app.add_middleware(RequestLimits, api_key=api_key, idle_s=body_idle_s)
    app.add_middleware(ServeMiddleware, api_key=api_key, metrics=metrics)
    install_error_handlers(app)
    app.include_router(openai.router)
    app.include_router(ops.router)
    return app
