"""The LoRA training loop: AdamW on the adapters, gradient accumulation, resumable checkpoints.

A checkpoint (adapters, optimiser state, step, loss log, the settings it was made with) is written
atomically (temp file, then rename) beside the output every `save_every` optimiser steps and at the
end; `resume` continues from it when the settings match (asking for more steps continues a finished run).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hetero.errors import HeteroError
from hetero.finetune.data import batches
from hetero.finetune.lora import LoraConfig, adapter_tensors, attach, new_parts
from hetero.finetune.step import forward_backward
from hetero.progress import progress_bar


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100            # optimiser steps
    lr: float = 5e-4
    seq_len: int = 256
    batch: int = 4              # sequences per micro-batch
    grad_accum: int = 1         # micro-batches per optimiser step
    seed: int = 0
    warmup: int = 0             # steps of linear lr warm-up
    schedule: str = "cosine"    # after warm-up: "cosine" (decays to 0 at the last step) or "constant"
    save_every: int = 50
    checkpoint: bool = True     # activation checkpointing per layer

    def __post_init__(self):
        for name in ("steps", "batch", "grad_accum"):
            if getattr(self, name) < 1:
                raise HeteroError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if not self.lr > 0:
            raise HeteroError(f"--lr must be > 0 (got {self.lr})")
        if self.warmup < 0:
            raise HeteroError(f"--warmup must be >= 0 (got {self.warmup})")
        if self.schedule not in ("cosine", "constant"):
            raise HeteroError(f"--schedule must be cosine or constant (got {self.schedule})")

    def lr_at(self, step: int) -> float:
        """The learning rate of optimiser step `step` (0-based): linear warm-up over `warmup` steps,
        then constant or a cosine down to 0 at the last step (transformers' cosine schedule)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.schedule == "constant":
            return self.lr
        done = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * done))


class AdamW:
    """AdamW (Loshchilov & Hutter) over a few adapter tensors. Not torch.optim's: its first step
    imports torch._dynamo (~80 MB of RSS here), which a budgeted run would pay for nothing."""

    def __init__(self, params: list[torch.Tensor], lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        self.params, self.lr, self.betas, self.eps, self.wd = params, lr, betas, eps, weight_decay
        self.t = 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            if self.wd:
                p.mul_(1 - self.lr * self.wd)
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            p.addcdiv_(m / c1, (v / c2).sqrt_().add_(self.eps), value=-self.lr)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        return {"t": self.t, "m": [x.clone() for x in self.m], "v": [x.clone() for x in self.v]}

    def load_state_dict(self, state: dict) -> None:
        self.t = int(state["t"])
        for dst, src in zip(self.m + self.v, list(state["m"]) + list(state["v"])):
            dst.copy_(src)


def _clip(params: list[torch.Tensor], max_norm: float) -> None:
    norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None))
    if norm > max_norm:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(max_norm / (float(norm) + 1e-6))


def checkpoint_path(out: str | Path) -> Path:
    out = Path(out).expanduser()
    return out.with_name(out.name + ".checkpoint.pt")


def _collate(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, T] padded with 0 at the end, targets [B, T] (next token; -100 past each sequence)."""
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    tgt = torch.full((len(seqs), T), -100, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s)
        tgt[r, :len(s) - 1] = torch.tensor(s[1:])
    return ids, tgt


def _save(state: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    torch.save(state, tmp)
    os.replace(tmp, path)


def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def train(net, spec, seqs: list[list[int]], lcfg: LoraConfig, tcfg: TrainConfig, out: str | Path,
          resume: bool = False, progress: bool = True, settings: dict | None = None, on_step=None) -> dict:
    """Train adapters on `net` (a Decoder, frozen; its layers get TrainLinears). Returns the record:
    loss log, tokens/s, the adapters (`parts`)."""
    torch.manual_seed(tcfg.seed)
    params = attach(net, spec, lcfg, new_parts(spec, lcfg, tcfg.seed))
    optim = AdamW(params, lr=tcfg.lr)
    key_settings = {**(settings or {}), **asdict(lcfg), **{k: v for k, v in asdict(tcfg).items()
                                                          if k not in ("steps", "save_every", "checkpoint")}}
    key = settings_key(key_settings)
    ckpt = checkpoint_path(out)
    step, log = 0, []
    if resume:
        if not ckpt.is_file():
            raise HeteroError(f"--resume: no checkpoint at {ckpt}")
        state = torch.load(ckpt, weights_only=True)
        if state.get("key") != key:
            raise HeteroError(f"--resume: {ckpt} was made with other settings (model, data or training "
                              "options differ); rerun without --resume to start over")
        with torch.no_grad():
            for p, v in zip(params, state["params"]):
                p.copy_(v)
        optim.load_state_dict(state["optim"])
        step, log = int(state["step"]), list(state["log"])
    tokens = seconds = cpu = 0.0
    ran = 0
    with progress_bar("finetune", tcfg.steps, enabled=progress) as advance:
        advance(step)
        while step < tcfg.steps:
            t0, c0 = time.perf_counter(), time.process_time()
            optim.lr = tcfg.lr_at(step)
            groups = [_collate(batches(seqs, tcfg.batch, step * tcfg.grad_accum + k, tcfg.seed))
                      for k in range(tcfg.grad_accum)]
            n_tok = sum(int((t != -100).sum()) for _, t in groups)
            nll = 0.0
            for ids, tgt in groups:
                nll += forward_backward(net, ids, tgt, n_tok, tcfg.checkpoint)
            _clip(params, 1.0)
            optim.step()
            optim.zero_grad()
            step += 1
            dt = time.perf_counter() - t0
            cpu += time.process_time() - c0
            tokens += sum(i.numel() for i, _ in groups)
            seconds += dt
            ran += 1
            loss = nll / n_tok
            if not math.isfinite(loss):
                raise HeteroError(f"the loss became {loss} at step {step}: lower --lr")
            log.append([step, round(loss, 5), round(dt, 4)])
            advance(note=f"loss {loss:.3f} | {tokens / seconds:,.0f} tok/s")
            if on_step is not None:
                on_step(step, loss, dt)
            if step % tcfg.save_every == 0 or step == tcfg.steps:
                ckpt.parent.mkdir(parents=True, exist_ok=True)
                _save({"key": key, "params": [p.detach().clone() for p in params], "optim": optim.state_dict(),
                       "step": step, "log": log}, ckpt)
    return {"log": log, "steps": step, "tokens_s": round(tokens / seconds, 1) if seconds else None,
            # the median step: a shared machine's stalls and the first step's allocations stay out of it
            "step_s": round(statistics.median(r[2] for r in log[-ran:]), 4) if ran else None,
            # CPU seconds per step (all threads): what the step cost where wall time also counts waiting
            "cpu_step_s": round(cpu / ran, 4) if ran else None,
            "parts": adapter_tensors(net), "settings": key_settings}
