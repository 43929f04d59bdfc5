"""GGUF export (Q8_0, Q4_0, Q4_1) through the gguf package, in llama.cpp's layout.

Matrices whose rows the 32-wide block divides are quantised to the chosen type; 1-D tensors (norms,
biases) and any other matrix stay F32. Q and K rows get llama.cpp's interleaved-RoPE permutation
(hetero's GGUF reader undoes it). The tokenizer metadata is copied from the source GGUF, so export
needs a GGUF at the root of the model's history (the built-in model, or an artifact made from one).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from hetero.compress.core import Loaded, fp32_bytes
from hetero.dtypes import storage_bytes
from hetero.errors import HeteroError
from hetero.model.spec import ModelSpec, expected_tensors
from hetero.ops.blocks import Q8_SEARCH, quantize_q8_0  # noqa: F401  (the writer's Q8_0; tests import it here)

TYPES = ("Q8_0", "Q4_0", "Q4_1")
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}


def quantize(arr: np.ndarray, qtype: str) -> np.ndarray:
    """A [rows, K] float32 matrix as GGUF bytes of `qtype` (Q4_0/Q4_1: the gguf package's rounding)."""
    import gguf

    if qtype == "Q8_0":
        return quantize_q8_0(arr)
    return gguf.quants.quantize(arr, gguf.GGMLQuantizationType[qtype])


def check_type(t: str) -> None:
    if t not in TYPES:
        raise HeteroError(f"unknown GGUF type {t!r}; known: {', '.join(TYPES)}")


def gguf_name(canonical: str) -> str:
    if canonical in _GLOBAL:
        return _GLOBAL[canonical]
    _, _, i, rest = canonical.split(".", 3)  # model.layers.{i}.{rest}
    return f"blk.{i}.{_LAYER[rest]}"


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order (interleaved RoPE pairs); the inverse of gguf._unpermute."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_gguf(loaded: Loaded) -> Path:
    """The GGUF whose tokenizer metadata the export copies."""
    if loaded.source.kind == "gguf":
        return loaded.source.path
    rec = loaded.record
    while rec:
        from hetero.model.sources import resolve

        try:
            src = resolve(rec.get("source"))
        except HeteroError:
            src = None
        if src is not None and src.kind == "gguf":
            return src.path
        rec = rec.get("previous")
    raise HeteroError("GGUF export copies the tokenizer from a GGUF source; this model has none in its history")


def _is_gguf(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return p.is_file() and f.read(4) == b"GGUF"
    except OSError:
        return False


def write_gguf(out: str | Path, loaded: Loaded, spec: ModelSpec, tensors: dict, qtype: str,
               record: dict | None, force: bool = False) -> dict:
    """Write `tensors` as a GGUF file of block type `qtype`; returns the record (with bytes)."""
    import gguf

    check_type(qtype)
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise HeteroError(f"{out} already exists; choose another -o or pass --force")
    if spec.architecture not in ("llama", "mistral"):
        raise HeteroError(f"GGUF export supports llama and mistral models (got {spec.architecture})")
    src_reader = gguf.GGUFReader(str(_tokenizer_gguf(loaded)), "r")
    qt = gguf.GGMLQuantizationType[qtype]
    arch = "llama"
    if out.exists() and not _is_gguf(out):
        raise HeteroError(f"{out} is not a GGUF file; --force replaces only those (remove it yourself)")
    if not out.parent.is_dir():
        raise HeteroError(f"{out.parent}: no such directory")
    from hetero.compress.artifact import remove_stale_partials

    remove_stale_partials(out)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent)
    except OSError as e:
        raise HeteroError(f"cannot write into {out.parent}: {e.strerror or e}") from None
    os.close(fd)
    total = 0
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(spec.name)
        w.add_block_count(spec.n_layers)
        w.add_context_length(spec.max_context)
        w.add_embedding_length(spec.hidden_size)
        w.add_feed_forward_length(spec.intermediate_size)
        w.add_head_count(spec.n_heads)
        w.add_head_count_kv(spec.n_kv_heads)
        w.add_rope_freq_base(spec.rope_theta)
        w.add_layer_norm_rms_eps(spec.norm_eps)
        w.add_rope_dimension_count(spec.head_dim)
        w.add_vocab_size(spec.vocab_size)
        w.add_file_type({"Q8_0": 7, "Q4_0": 2, "Q4_1": 3}[qtype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, field in src_reader.fields.items():
            if key.startswith("tokenizer."):
                sub = field.types[1] if len(field.types) > 1 else None
                w.add_key_value(key, field.contents(), field.types[0], sub)
        for name, shape in expected_tensors(spec):
            arr = tensors[name].float().numpy()
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                arr = _permute(arr, spec.n_heads)
            elif name.endswith(("k_proj.weight", "k_proj.bias")):
                arr = _permute(arr, spec.n_kv_heads)
            arr = np.ascontiguousarray(arr, dtype=np.float32)
            if arr.ndim == 2 and arr.shape[1] % 32 == 0:
                w.add_tensor(gguf_name(name), quantize(arr, qtype), raw_dtype=qt)
                total += storage_bytes(qtype, shape)
            else:
                w.add_tensor(gguf_name(name), arr)
                total += arr.nbytes
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    rec = dict(record or {"method": "convert", "source": loaded.model, "baseline_fp32_bytes": fp32_bytes(loaded.spec)})
    rec.update({"format": f"gguf-{qtype}", "bytes": total})
    return rec
