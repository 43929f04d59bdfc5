"""`hetero run` and `hetero info`: generate with a model, or describe it without loading weights."""
from __future__ import annotations

import json
import resource
import sys
from typing import Optional

import typer

DEFAULT_PROMPT = "What is the capital of France?"


def peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 | bf16 | int8 | int4 for every unit."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: torch's)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming text."),
) -> None:
    """Generate text from PROMPT, streaming it to stdout, and end with a one-line summary."""
    import hetero

    m = hetero.load(model, dtype=dtype, threads=threads)
    ids: list[int] = []
    text: list[str] = []
    last = None
    for rec in m.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, repetition_penalty=repetition_penalty, seed=seed, chat=chat):
        ids += rec.token_ids
        text.append(rec.text)
        last = rec
        if not as_json:
            sys.stdout.write(rec.text)
            sys.stdout.flush()
    result = {
        "model": m.spec.name, "dtype": dtype, "text": "".join(text), "token_ids": ids,
        "prompt_tokens": last.prompt_tokens, "generated_tokens": last.generated_tokens,
        "prefill_tok_s": round(last.prefill_tok_s, 2), "decode_tok_s": round(last.decode_tok_s, 2),
        "finish_reason": last.finish_reason, "peak_rss_bytes": peak_rss_bytes(),
        "load_s": round(m.load_s, 3),
    }
    if as_json:
        print(json.dumps(result))
        return
    print()
    print(f"[{result['prompt_tokens']} prompt tokens, {result['generated_tokens']} generated | "
          f"prefill {result['prefill_tok_s']:.1f} tok/s, decode {result['decode_tok_s']:.1f} tok/s | "
          f"peak RSS {_fmt_bytes(result['peak_rss_bytes'])} | {dtype} | finish: {result['finish_reason']}]",
          file=sys.stderr)


def info(
    model: Optional[str] = typer.Argument(None, help="A .gguf file, an HF dir, `smollm2-135m` (default) or `synthetic:NAME`."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Describe MODEL from its headers alone: shape, parameters, bytes per precision, a layer table."""
    import hetero
    from hetero.dtypes import PRECISIONS

    spec = hetero.spec(model)
    per_precision = {p: spec.total_bytes(p) for p in PRECISIONS}
    units = [
        {"unit": u, "params": spec.unit_params(u), "stored_bytes": spec.unit_stored_bytes(u),
         "bf16_bytes": spec.unit_bytes(u, "bf16"), "decode_flops": spec.unit_flops_per_token(u, 1)}
        for u in spec.unit_names()
    ]
    if as_json:
        print(json.dumps({**spec.summary(), "bytes": per_precision,
                          "kv_bytes_per_token_bf16": spec.kv_bytes_per_token("bf16"), "units": units}))
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
            f" | KV cache {_fmt_bytes(spec.kv_bytes_per_token('bf16'))}/token (bf16)")
    t = Table("unit", "params", "stored", "bf16", "decode FLOPs/token")
    rows = units if len(units) <= 12 else units[:5] + [None] + units[-4:]
    for u in rows:
        if u is None:
            t.add_row("…", "", "", "", "")
            continue
        t.add_row(u["unit"], f"{u['params'] / 1e6:,.2f}M", _fmt_bytes(u["stored_bytes"]),
                  _fmt_bytes(u["bf16_bytes"]), f"{u['decode_flops'] / 1e6:,.1f}M")
    c.print(t)


def register(app: typer.Typer) -> None:
    app.command()(run)
    app.command()(info)
