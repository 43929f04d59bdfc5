"""`hetero serve`: the OpenAI-compatible HTTP API over a loaded model."""
from __future__ import annotations

import sys
from typing import Any, Optional

import typer

from hetero.errors import HeteroError


def load_engine(model: Optional[str], dtype: str, threads: Optional[int]) -> tuple[Any, Optional[dict]]:
    """The model to serve and the plan GET /plan shows (None: the app describes the loaded units).

    Extension point: planning flags (memory budgets, --plan FILE, objectives) belong here. Build a
    Plan, load the planned engine from it, and return (engine, plan.to_dict()); the server only needs
    the Model interface (`stream`, `prompt_ids`, `spec`, `net.units`).
    """
    import hetero

    return hetero.load(model, dtype=dtype, threads=threads), None


def serve(
    model: Optional[str] = typer.Argument(None, help="A .gguf file, an HF dir, `smollm2-135m` (default) or `synthetic:NAME`."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 | bf16 | int8 | int4 for every unit."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="HETERO_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on every route but /health."),
    max_concurrency: int = typer.Option(8, "--max-concurrency", help="Generations interleaved on the engine at once."),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests that may wait beyond those; more get 429."),
    max_body_bytes: int = typer.Option(1 << 20, "--max-body-bytes", help="Largest request body accepted (413 past it)."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="The model id clients send (default: the model's name)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for the engine (default: torch's)."),
    log_level: str = typer.Option("warning", "--log-level", help="uvicorn log level."),
) -> None:
    """Serve MODEL over the OpenAI API: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics, /plan."""
    if not 0 < port < 65536:
        raise HeteroError(f"--port must be in 1..65535, got {port}")
    if max_concurrency < 1 or max_queue < 0:
        raise HeteroError("--max-concurrency must be ≥ 1 and --max-queue ≥ 0")
    if max_body_bytes < 1024:
        raise HeteroError(f"--max-body-bytes must be at least 1024, got {max_body_bytes}")
    _check_port(host, port)
    import uvicorn

    from hetero.serve.app import create_app

    m, plan = load_engine(model, dtype, threads)
    app = create_app(m, model_id=model_name, aliases=(model,) if model else (), plan=plan, dtype=dtype,
                     api_key=api_key, max_concurrency=max_concurrency, max_queue=max_queue,
                     max_body_bytes=max_body_bytes)
    name = app.state.model_id
    print(f"serving {name} ({dtype}) at http://{host}:{port}/v1  "
          f"[max concurrency {max_concurrency}, queue {max_queue}{', API key required' if api_key else ''}]",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


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
