"""`hetero finetune MODEL --data FILE -o ADAPTER_DIR`: LoRA adapters over the frozen, planned base."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional

import typer


def finetune(
    model: Optional[str] = typer.Argument(None, help="A .gguf file, an HF dir, `smollm2-135m` (default) or `synthetic:NAME`."),
    data: str = typer.Option(..., "--data", help="Training text: FILE.txt (one stream) or FILE.jsonl ({\"text\": ...} a line)."),
    out: Optional[str] = typer.Option(None, "-o", "--out", help="The adapter directory to write (PEFT format)."),
    rank: int = typer.Option(8, "--rank", help="LoRA rank r."),
    alpha: float = typer.Option(16.0, "--alpha", help="LoRA alpha (the update is scaled by alpha/r)."),
    targets: str = typer.Option("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "--targets", help="Modules to adapt (PEFT names; default every linear of a layer): q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj."),
    lr: float = typer.Option(5e-4, "--lr", help="AdamW learning rate (the peak, after warm-up)."),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Steps of linear learning-rate warm-up (default: 5% of the steps)."),
    schedule: str = typer.Option("cosine", "--schedule", help="After warm-up: cosine (down to 0 at the last step) or constant."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimiser steps (default: one epoch)."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Passes over the data (instead of --steps)."),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per training sequence (longer examples are truncated, with a note)."),
    batch: int = typer.Option(4, "--batch", help="Sequences per micro-batch."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimiser step."),
    seed: int = typer.Option(0, "--seed", help="Seed for the adapters' initialisation and the data order."),
    memory: Optional[str] = typer.Option(None, "--memory", help="Budgets for the whole process, as `hetero run` takes them (e.g. cpu=1GB,disk=20GB)."),
    precisions: Optional[str] = typer.Option(None, "--precisions", help="Base precisions the planner may use, e.g. bf16,int8."),
    checkpointing: Optional[bool] = typer.Option(None, "--checkpointing/--no-checkpointing", help="Recompute each layer in backward (default: as the plan chooses)."),
    save_every: int = typer.Option(50, "--save-every", help="Write a resumable checkpoint every N steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint beside -o (same settings)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Plan only: placement, training memory and predicted step time."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: torch's)."),
) -> None:
    """Train a LoRA adapter on DATA over MODEL, planned (placement, precision, streaming) within --memory."""
    from hetero.errors import HeteroError
    from hetero.finetune.data import read_examples
    from hetero.finetune.lora import LoraConfig
    from hetero.finetune.train import TrainConfig
    from hetero.model.sources import resolve_spec
    from hetero.plan.train import TrainWorkload

    if out is None and not dry_run:
        raise HeteroError("give -o ADAPTER_DIR (where the adapter is written)")
    if steps is not None and epochs is not None:
        raise HeteroError("give --steps or --epochs, not both")
    if epochs is not None and not epochs > 0:
        raise HeteroError(f"--epochs must be > 0 (got {epochs})")
    lcfg = LoraConfig(rank, alpha, tuple(t.strip() for t in targets.split(",") if t.strip()))
    TrainConfig(steps=steps or 1, lr=lr, seq_len=seq_len, batch=batch, grad_accum=grad_accum,
                warmup=warmup or 0, schedule=schedule)  # checks the numbers
    if out is not None:
        o = Path(out).expanduser()
        if o.exists() and not (o.is_dir() and ((o / "adapter_config.json").is_file() or not any(o.iterdir()))):
            raise HeteroError(f"{o} exists and is not an adapter directory: choose another -o")
    read_examples(data)  # bad data fails before the model loads
    spec = resolve_spec(model)
    precs = [p.strip() for p in precisions.split(",") if p.strip()] if precisions else None
    wl = TrainWorkload(seq_len, batch, grad_accum, rank, lcfg.targets)
    from hetero.runtime.memory import Footprint, fixed_mmap_threshold

    fixed_mmap_threshold()  # a step's transients go back to the system when freed (runtime/memory.py)
    mon = Footprint().start()
    from hetero.finetune.plan_train import plan_training
    from hetero.runtime import engine as eng

    if threads:  # before planning: the profile, and so the predicted step, is per thread count
        import torch

        torch.set_num_threads(threads)
    plan, ckpt, pred, notes = plan_training(model, spec, wl, memory, precs, checkpointing)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    info = {"plan": eng.summary(plan), "checkpointing": ckpt, "predicted_step_s": round(pred["step_s"], 4),
            "predicted_tokens_s": round(pred["tokens_s"], 1), "training_memory": pred["memory"],
            "streamed_read_bytes_per_step": pred["read_bytes"]}
    if dry_run:
        _print(info, as_json, dry=True)
        mon.stop()
        return
    import torch

    from hetero.finetune.adapter_io import save_adapter
    from hetero.finetune.data import sequences
    from hetero.finetune.train import train

    e = eng.Engine.load(plan, model, progress=not as_json, monitor=mon, order="train")
    try:
        seqs, dnotes = sequences(e.model.tokenizer, data, seq_len, spec.max_context)
        for n in dnotes:
            print(f"note: {n}", file=sys.stderr)
        per_step = batch * grad_accum
        n_steps = steps or max(1, math.ceil((epochs or 1.0) * len(seqs) / per_step))
        tcfg = TrainConfig(steps=n_steps, lr=lr, seq_len=seq_len, batch=batch, grad_accum=grad_accum, seed=seed,
                           warmup=round(0.05 * n_steps) if warmup is None else warmup, schedule=schedule,
                           save_every=save_every, checkpoint=ckpt)
        settings = {"model": spec.fingerprint(), "data": _digest(data)}
        rec = train(e.model.net, spec, seqs, lcfg, tcfg, out, resume=resume, progress=not as_json,
                    settings=settings)
        rep = e.report()
    finally:
        e.close()
    peak = mon.stop()
    log = rec["log"]
    extra = {"base": spec.name, "data": str(data), "sequences": len(seqs), "steps": rec["steps"],
             "loss_first": log[0][1] if log else None, "loss_last": log[-1][1] if log else None,
             "log": log, "checkpointing": ckpt}
    save_adapter(out, spec, lcfg, rec["parts"], extra)
    budget = plan.budgets.get("cpu")
    info.update({"adapter": str(out), "steps": rec["steps"], "sequences": len(seqs),
                 "loss_first": extra["loss_first"], "loss_last": extra["loss_last"],
                 "measured_step_s": rec["step_s"], "measured_tokens_s": rec["tokens_s"],
                 "measured_cpu_step_s": rec["cpu_step_s"], "threads": torch.get_num_threads(),
                 "step_vs_predicted": round(rec["step_s"] / pred["step_s"] - 1, 4) if rec["step_s"] else None,
                 "peak_footprint_bytes": peak, "budget_bytes": budget, "streaming": rep.get("streaming")})
    _print(info, as_json)


def _digest(path: str) -> str:
    import hashlib

    return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()[:16]


def _print(info: dict, as_json: bool, dry: bool = False) -> None:
    from hetero.plan.units import fmt_bytes

    if as_json:
        print(json.dumps(info))
        return
    print(info["plan"])
    mem = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in info["training_memory"].items())
    print(f"training: checkpointing {'on' if info['checkpointing'] else 'off'} | {mem} | predicted "
          f"{info['predicted_step_s']:.3f} s/step, {info['predicted_tokens_s']:,.0f} tok/s"
          + (f" | streamed {fmt_bytes(info['streamed_read_bytes_per_step'])}/step" if info["streamed_read_bytes_per_step"] else ""))
    if dry:
        return
    print(f"adapter {info['adapter']}: {info['steps']} steps over {info['sequences']} sequences, loss "
          f"{info['loss_first']:.4f} -> {info['loss_last']:.4f} | {info['measured_tokens_s']:,.0f} tok/s | peak "
          f"{fmt_bytes(info['peak_footprint_bytes'])}"
          + (f" of {fmt_bytes(info['budget_bytes'])}" if info["budget_bytes"] else ""))
    if info["measured_step_s"]:
        print(f"step time: measured {info['measured_step_s']:.3f} s, predicted {info['predicted_step_s']:.3f} s "
              f"({info['step_vs_predicted']:+.0%}); {info['measured_cpu_step_s']:.3f} CPU s/step on "
              f"{info['threads']} thread(s)")


def register(app: typer.Typer) -> None:
    app.command()(finetune)
