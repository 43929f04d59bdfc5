"""AWQ (Lin et al. 2023): activation-aware per-input-channel scaling, then an int4 grid.

Channels that see large activations matter most to a layer's output, so they get a larger share
of the grid: each input channel j of the matrices sharing one input is multiplied by
s_j = mean|x_j|^alpha (normalised to geometric mean ~1) before quantisation, and the inverse 1/s_j
is folded into whatever produces that input, so the float model is unchanged:

  q|k|v      input_layernorm weight / s              (q, k, v share the attention norm's output)
  gate|up    post_attention_layernorm weight / s
  o          v rows / s (one s per kv channel: q heads sharing a kv head share its scale)
  down       up rows / s                              (silu(gate) * up is linear in up)
  head       final norm / s (untied heads only: a tied head is the embedding, which has no fold)

alpha is grid-searched per group on calibration data; the error of a candidate is the group's
layer-output error tr(dW XᵀX dWᵀ)/n, computed from the calibration Gram matrix. alpha = 0 is
plain round-to-nearest, so the chosen scale never does worse than RTN on that error. Then the
scaled weights go on the grid (round to nearest, or GPTQ with the Hessian of the scaled inputs).
"""
from __future__ import annotations

import torch

from hetero.compress.core import Loaded, head_name
from hetero.compress.grid import quantize
from hetero.compress.methods import (Options, _check_group, _grid_record, _quantized, calibration, int4_record,
                                     register)
from hetero.errors import HeteroError


def output_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> float:
    """tr(dW H dWᵀ) for dW = w - wq [N, K] and H = XᵀX/n [K, K]: the mean squared output error."""
    d = w - wq
    return float(((d @ h) * d).sum())


def search(ws: list[torch.Tensor], mean_abs: torch.Tensor, h: torch.Tensor, group: int, sym: bool,
           alphas: int = 20, tie=None, zp: bool = False) -> tuple[torch.Tensor, float, float, float]:
    """Best scale s [K] for the matrices `ws` ([N_i, K]) sharing one input with mean |x| `mean_abs`
    [K] and H = XᵀX/n [K, K]; `tie` maps a [K] vector to one constant where scales must be shared.
    Returns (s, alpha, error at s, error of plain RTN)."""
    w = torch.cat([x.float() for x in ws])
    xm = mean_abs.float().clamp(min=1e-6)
    if tie is not None:
        xm = tie(xm)
    best = (None, 0.0, float("inf"))
    rtn_err = None
    for i in range(alphas):
        a = i / alphas
        s = xm ** a
        s = s / torch.sqrt(s.max() * s.min())
        err = output_error(w, quantize(w * s, group, sym, zp=zp).dequantize() / s, h)
        if i == 0:
            rtn_err = err
        if err < best[2]:
            best = (s, a, err)
    return best[0], best[1], best[2], rtn_err


def _kv_tie(n_heads: int, n_kv: int, head_dim: int):
    """o's input channels (q head h, dim d) take the mean over the q heads sharing kv head h // rep,
    so one scale per kv channel folds exactly into v's rows."""
    rep = n_heads // n_kv

    def tie(x: torch.Tensor) -> torch.Tensor:
        m = x.reshape(n_kv, rep, head_dim).mean(dim=1, keepdim=True)
        return m.expand(n_kv, rep, head_dim).reshape(-1)

    return tie


def scale_model(loaded: Loaded, grams: dict, group: int, sym: bool, alphas: int = 20, zp: bool = False,
                head: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """The float tensors with each group's searched scale applied and folded; the scale applied to
    each linear's input columns (for the Hessian of GPTQ on top); a summary of the search."""
    spec = loaded.spec
    t = {k: v.clone() for k, v in loaded.tensors.items()}
    col: dict[str, torch.Tensor] = {}
    chosen, err_awq, err_rtn = [], 0.0, 0.0
    rep_dim = spec.n_kv_heads * spec.head_dim

    def run(names: list[str], fold_into: str, fold_rows=None, tie=None) -> None:
        nonlocal err_awq, err_rtn
        g = grams[names[0]]
        h = (g.xtx / max(g.n, 1)).float()
        s, a, e, e0 = search([t[n] for n in names], g.mean_abs(), h, group, sym, alphas, tie, zp)
        chosen.append(a)
        err_awq, err_rtn = err_awq + e, err_rtn + e0
        for n in names:
            t[n] = t[n] * s[None, :]
            col[n] = s
        f = s if fold_rows is None else fold_rows(s)
        if t[fold_into].dim() == 1:  # a norm weight scales its output channels
            t[fold_into] = t[fold_into] / f
        else:                        # a linear's output rows (and its bias, if any)
            t[fold_into] = t[fold_into] / f[:, None]
            bias = fold_into[:-len("weight")] + "bias"
            if bias in t:
                t[bias] = t[bias] / f

    rep = spec.n_heads // spec.n_kv_heads
    for i in range(spec.n_layers):
        p = f"model.layers.{i}."
        run([p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight"],
            p + "input_layernorm.weight")
        run([p + "self_attn.o_proj.weight"], p + "self_attn.v_proj.weight",
            fold_rows=lambda s: s.reshape(spec.n_kv_heads, rep, spec.head_dim)[:, 0].reshape(rep_dim),
            tie=_kv_tie(spec.n_heads, spec.n_kv_heads, spec.head_dim))
        run([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"], p + "post_attention_layernorm.weight")
        run([p + "mlp.down_proj.weight"], p + "mlp.up_proj.weight")
    if not spec.tie_embeddings and head_name(spec) in grams and head:
        run([head_name(spec)], "model.norm.weight")
    summary = {"mean_alpha": round(sum(chosen) / len(chosen), 4),
               "calib_output_error_vs_rtn": round(err_awq / err_rtn, 4) if err_rtn else None}
    return t, col, summary


def scaled_hessian(gram, s: torch.Tensor | None) -> torch.Tensor:
    """The Hessian of a linear whose input columns were multiplied by s: its inputs are x / s."""
    h = gram.hessian()
    return h if s is None else h / (s.double()[:, None] * s.double()[None, :])


@register("awq", "int4 group-wise after AWQ activation-aware channel scaling (--group, --sym, --awq-grid rtn|gptq)")
def _awq(loaded: Loaded, opts: Options):
    from hetero.compress.core import one_thread
    from hetero.compress.quant import gptq_grid

    _check_group(opts)
    if opts.awq_grid not in ("rtn", "gptq"):
        raise HeteroError(f"--awq-grid must be rtn or gptq (got {opts.awq_grid!r})")
    if loaded.spec.n_heads % loaded.spec.n_kv_heads:
        raise HeteroError("awq needs the query heads to be a multiple of the kv heads")
    grams = calibration(loaded, opts)
    with one_thread():
        scaled, col, summary = scale_model(loaded, grams, opts.group, opts.sym, opts.awq_alphas, opts.zero_point,
                                           opts.head)
    if opts.awq_grid == "gptq":
        def fn(n, w):
            return gptq_grid(w, scaled_hessian(grams[n], col.get(n)), opts.group, opts.sym,
                             act_order=opts.act_order, zp=opts.zero_point)
    else:
        def fn(n, w):
            return quantize(w, opts.group, opts.sym, zp=opts.zero_point)
    out = _quantized(loaded, fn, f"awq+{opts.awq_grid}", tensors=scaled, include_head=opts.head)
    return _grid_record(out, int4_record(loaded, opts, grid=opts.awq_grid, alphas=opts.awq_alphas,
                                         calib_tokens=opts.calib_tokens, **summary,
                                         head_scaled=not loaded.spec.tie_embeddings and opts.head))
