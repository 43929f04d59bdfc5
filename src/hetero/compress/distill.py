"""Distillation: a shallower student initialised from the teacher's layers, trained to match it.

The student keeps `layers` of the teacher's decoder layers, evenly spaced (first and last always
kept), and trains on the calibration half of the built-in corpus with
    loss = α · CE(student, next token) + (1 − α) · τ² · KL(teacher_τ ‖ student_τ)
(Hinton et al. 2015). The embedding (also the head when tied) is frozen: it is a third of a small
model's parameters and the student's layers are what changed. The student trains as a transformers
Llama module (autograd) and is saved back to canonical tensors; the teacher runs in hetero.
A checkpoint (student weights, optimiser state, step) is written atomically every `save_every`
steps beside the output, and a rerun with the same settings resumes from it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch

from hetero.compress.core import build_net
from hetero.compress.methods import Options, register
from hetero.errors import HeteroError
from hetero.progress import progress_bar


def kept_layers(n: int, keep: int) -> list[int]:
    """`keep` evenly spaced layer indices out of n, first and last included."""
    if not 1 <= keep <= n:
        raise HeteroError(f"--layers must be between 1 and {n} (got {keep})")
    if keep == 1:
        return [0]
    return sorted({round(i * (n - 1) / (keep - 1)) for i in range(keep)})


def student_tensors(tensors: dict[str, torch.Tensor], keep: list[int]) -> dict[str, torch.Tensor]:
    """Canonical tensors of the student: the kept layers renumbered 0..len(keep)-1."""
    out = {n: t for n, t in tensors.items() if not n.startswith("model.layers.")}
    for j, i in enumerate(keep):
        p = f"model.layers.{i}."
        for n, t in tensors.items():
            if n.startswith(p):
                out[f"model.layers.{j}." + n[len(p):]] = t.clone()
    return out


def _hf_student(spec, tensors):
    import transformers

    from hetero.compress.artifact import hf_config

    cfg = hf_config(spec, None)
    cfg.pop("architectures"), cfg.pop("_name_or_path"), cfg.pop("torch_dtype")
    config_cls = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}[spec.architecture]
    model_cls = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[spec.architecture]
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**cfg))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or [m for m in missing if "rotary" not in m and not (spec.tie_embeddings and m == "lm_head.weight")]:
        raise HeteroError(f"student does not match its weights (missing {missing[:2]}, unexpected {unexpected[:2]})")
    if spec.tie_embeddings:
        model.tie_weights()
    return model.float()


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def distill(loaded, opts: Options, seq_len: int = 128, lr: float = 2e-4, temperature: float = 2.0,
            alpha: float = 0.5, save_every: int = 20, checkpoint_dir: str | Path | None = None):
    """Train the student (alpha=0: pure distillation); returns (canonical tensors, student spec, training log)."""
    from hetero.eval.corpus import calib_ids

    spec = loaded.spec
    n_keep = opts.layers or max(1, (2 * spec.n_layers) // 3)
    keep = kept_layers(spec.n_layers, n_keep)
    sspec = dataclasses.replace(spec, n_layers=len(keep), tensors=())
    teacher = build_net(spec, loaded.tensors)
    student = _hf_student(sspec, student_tensors(loaded.tensors, keep))
    for name, p in student.named_parameters():
        p.requires_grad = "embed_tokens" not in name and not (spec.tie_embeddings and name == "lm_head.weight")
    params = [p for p in student.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ids = torch.tensor(calib_ids(loaded.tokenizer, opts.calib_tokens, opts.calib_text))
    seqs = [ids[a:a + seq_len] for a in range(0, len(ids) - seq_len + 1, seq_len)]
    if not seqs:
        raise HeteroError(f"--calib-tokens {opts.calib_tokens} is shorter than one training sequence ({seq_len})")
    settings = {"keep": keep, "seq_len": seq_len, "lr": lr, "T": temperature, "alpha": alpha,
                "calib_tokens": opts.calib_tokens, "model": loaded.model}
    # The step count is not part of the key: asking for more steps continues a finished run.
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    ckpt = Path(checkpoint_dir) / f"distill-{key}.pt" if checkpoint_dir else None
    step, log = 0, []
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        student.load_state_dict(state["student"])
        optim.load_state_dict(state["optim"])
        step, log = int(state["step"]), list(state["log"])
    cache = teacher.new_cache(1, seq_len)
    student.train()
    with progress_bar("distilling", opts.steps, enabled=opts.progress) as advance:
        advance(step)
        while step < opts.steps:
            x = seqs[step % len(seqs)].unsqueeze(0)                                   # [1, T]
            with torch.no_grad():
                t_logits = teacher(x, 0, cache, last_only=False)[:, :-1]              # [1, T-1, V]
            s_logits = student(input_ids=x).logits[:, :-1].float()
            ce = torch.nn.functional.cross_entropy(s_logits.flatten(0, 1), x[:, 1:].flatten())
            kl = torch.nn.functional.kl_div(torch.log_softmax(s_logits / temperature, -1),
                                            torch.log_softmax(t_logits / temperature, -1),
                                            log_target=True, reduction="batchmean") / (seq_len - 1)
            loss = alpha * ce + (1 - alpha) * temperature ** 2 * kl
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optim.step()
            step += 1
            log.append([step, round(ce.item(), 4), round(kl.item(), 4)])
            advance()
            if ckpt is not None and (step % save_every == 0 or step == opts.steps):
                ckpt.parent.mkdir(parents=True, exist_ok=True)
                _atomic_save({"student": student.state_dict(), "optim": optim.state_dict(), "step": step,
                              "log": log}, ckpt)
    state = {k: v.detach().float().clone() for k, v in student.state_dict().items() if "rotary" not in k}
    if spec.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state, sspec, {"kept_layers": keep, "log": log, "steps": opts.steps, **settings}


@register("distill", "student with --layers of the teacher's layers (default 2/3), trained --steps with KD")
def _distill(loaded, opts: Options):
    tensors, sspec, info = distill(loaded, opts, checkpoint_dir=opts.checkpoint_dir)
    log = info.pop("log")
    return tensors, {"_spec": sspec, "n_layers": sspec.n_layers, "teacher_layers": loaded.spec.n_layers,
                     **info, "final_ce": log[-1][1] if log else None,
                     "bytes": sum(4 * t.numel() for t in tensors.values())}
