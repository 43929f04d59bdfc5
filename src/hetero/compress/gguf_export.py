"""GGUF export (Q8_0, Q4_0, Q4_1) through the gguf package, in llama.cpp's layout.

Matrices whose rows the 32-wide block divides are quantised to the chosen type; 1-D tensors (norms,
biases) and any other matrix stay F32. Q and K rows get llama.cpp's interleaved-RoPE permutation
(hetero's GGUF reader undoes it). The tokenizer metadata is copied from the source GGUF, so export
needs a GGUF at the root of the model's history (the built-in model, or an artifact made from one);
a synthetic model gets the built-in model's (its shapes on that vocabulary) or a byte-level one.

The writer streams: tensor infos first, then one tensor at a time is made, encoded and written, so a
synthetic 7B is written in ~1 GB (its largest tensor), never holding the model.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np

from hetero.compress.core import Loaded, fp32_bytes
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
    # mixtures of experts: llama.cpp's merged [E, ...] expert tensors, router and shared expert
    "mlp.gate.weight": "ffn_gate_inp.weight", "mlp.experts.gate_proj.weight": "ffn_gate_exps.weight",
    "mlp.experts.up_proj.weight": "ffn_up_exps.weight", "mlp.experts.down_proj.weight": "ffn_down_exps.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
}
# spec.architecture -> the GGUF arch llama.cpp runs it as (Mixtral is `llama` with experts)
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2_moe": "qwen2moe",
             "qwen3_moe": "qwen3moe"}
# Q/K rows in llama.cpp's interleaved-RoPE order: the `llama` arch only (the Qwen arches rotate halves)
_PERMUTED = ("llama", "mistral", "mixtral")
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}


def quantize(arr: np.ndarray, qtype: str, search: bool = True) -> np.ndarray:
    """A [rows, K] float32 matrix as GGUF bytes of `qtype` (Q4_0/Q4_1: the gguf package's rounding;
    Q8_0: the scale search unless `search` is False)."""
    import gguf

    if qtype == "Q8_0":
        return quantize_q8_0(arr, search=Q8_SEARCH if search else 1)
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
    if loaded.source.kind == "synthetic":
        from hetero.model.synthetic import tokenizer_gguf

        path = tokenizer_gguf(loaded.source.name)
        if path is not None:
            return path
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


def _synthetic_tokenizer(loaded: Loaded):
    from hetero.model.synthetic import tokenizer_gguf

    return tokenizer_gguf(loaded.source.name)


def _is_gguf(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return p.is_file() and f.read(4) == b"GGUF"
    except OSError:
        return False


def write_gguf(out: str | Path, loaded: Loaded, spec: ModelSpec, tensors: dict, qtype: str,
               record: dict | None, force: bool = False, progress: bool = False, grids: dict | None = None) -> dict:
    """Write `tensors` as a GGUF file; returns the record, whose `bytes` are the file's.

    A matrix with a Grid in `grids` (what a quantiser chose) is written as that grid's blocks, no
    second rounding; every other matrix is quantised to `qtype`."""
    check_type(qtype)
    check_target(out, spec, force)
    grids = grids or {}
    if loaded.source.kind == "synthetic" and _synthetic_tokenizer(loaded) is None:
        kv = byte_vocab_kv(spec.vocab_size)  # a synthetic model without a trained vocabulary
    else:
        kv = tokenizer_kv(_tokenizer_gguf(loaded))
    types = {n: g.ggml_type for n, g in grids.items()}

    def get(name, shape):
        return grids[name].blocks() if name in grids else tensors[name]

    write_stream(out, spec, get, qtype, kv, progress=progress, types=types)
    rec = dict(record or {"method": "convert", "source": loaded.model, "baseline_fp32_bytes": fp32_bytes(loaded.spec)})
    stored = sorted({types.get(n, qtype) for n, shape in expected_tensors(spec) if n in types or _quantised(n, shape)})
    rec.update({"format": f"gguf-{'+'.join(stored)}", "bytes": Path(out).expanduser().stat().st_size})
    if grids:
        rec["grid_exact"] = True  # the file holds the method's grid, not a re-rounding of it
    return rec


def stored_values(spec: ModelSpec, tensors: dict, qtype: str, grids: dict | None = None) -> dict:
    """`tensors` as write_gguf stores them: grid matrices as their grids' values (already so), other
    block-divisible matrices through a `qtype` round trip, the rest unchanged (F32)."""
    import torch

    from hetero.ops.blocks import BlockTensor

    out = dict(tensors)
    for name, shape in expected_tensors(spec):
        if name in (grids or {}) or not _quantised(name, shape):
            continue
        data = torch.from_numpy(_encode(tensors[name], qtype, True))
        out[name] = BlockTensor(qtype, data, tuple(shape)).dequantize()
    return out


def write_synthetic_gguf(out: str | Path, name: str, qtype: str, force: bool = False,
                         progress: bool = True, seed: int = 0) -> dict:
    """synthetic:NAME as a GGUF file, each tensor generated, quantised and written before the next
    (peak memory ~ the largest tensor, never the model). Q8_0 rounds to nearest: the scale search
    buys ~20% less squared error on Gaussian weights whose values mean nothing, at ~60x the time."""
    from hetero.model import synthetic
    from hetero.model.sources import resolve_spec

    check_type(qtype)
    spec = resolve_spec(f"synthetic:{name}")
    check_target(out, spec, force)
    tok = synthetic.tokenizer_gguf(name)
    kv = tokenizer_kv(tok) if tok is not None else byte_vocab_kv(spec.vocab_size)
    total = write_stream(out, spec, lambda n, shape: synthetic.tensor(n, shape, seed), qtype, kv,
                         search=False, progress=progress)
    return {"method": "convert", "source": f"synthetic:{name}", "baseline_fp32_bytes": fp32_bytes(spec),
            "format": f"gguf-{qtype}", "bytes": total}


def check_target(out: str | Path, spec: ModelSpec, force: bool) -> None:
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise HeteroError(f"{out} already exists; choose another -o or pass --force")
    if spec.architecture not in GGUF_ARCH:
        raise HeteroError(f"GGUF export supports {', '.join(GGUF_ARCH)} models (got {spec.architecture})")
    if out.exists() and not _is_gguf(out):
        raise HeteroError(f"{out} is not a GGUF file; --force replaces only those (remove it yourself)")
    if not out.parent.is_dir():
        raise HeteroError(f"{out.parent}: no such directory")


KV = list[tuple[str, object, object, object]]  # (key, value, GGUFValueType, sub-type of arrays)


def tokenizer_kv(path: Path) -> KV:
    """The tokenizer.* fields of a GGUF file, ready for GGUFWriter.add_key_value."""
    import gguf

    reader = gguf.GGUFReader(str(path), "r")
    return [(k, f.contents(), f.types[0], f.types[1] if len(f.types) > 1 else None)
            for k, f in reader.fields.items() if k.startswith("tokenizer.")]


def byte_vocab_kv(vocab_size: int) -> KV:
    """A SentencePiece-style vocabulary of hetero's byte-level fallback (id 3 + byte; 0-2 unk, bos,
    eos; the rest unused), so llama.cpp runs a synthetic model that has no trained vocabulary."""
    import gguf

    if vocab_size < 259:
        raise HeteroError(f"a byte-level vocabulary needs >= 259 tokens (the model has {vocab_size})")
    tt = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    tokens += [f"<unused{i}>" for i in range(vocab_size - len(tokens))]
    types = [tt.UNKNOWN, tt.CONTROL, tt.CONTROL] + [tt.BYTE] * 256 + [tt.UNUSED] * (vocab_size - 259)
    V, A = gguf.GGUFValueType, gguf.GGUFValueType.ARRAY
    return [("tokenizer.ggml.model", "llama", V.STRING, None),
            ("tokenizer.ggml.tokens", tokens, A, V.STRING),
            ("tokenizer.ggml.scores", [0.0] * vocab_size, A, V.FLOAT32),
            ("tokenizer.ggml.token_type", [int(t) for t in types], A, V.INT32),
            ("tokenizer.ggml.unknown_token_id", 0, V.UINT32, None),
            ("tokenizer.ggml.bos_token_id", 1, V.UINT32, None),
            ("tokenizer.ggml.eos_token_id", 2, V.UINT32, None),
            ("tokenizer.ggml.add_bos_token", False, V.BOOL, None),
            ("tokenizer.ggml.add_space_prefix", False, V.BOOL, None)]


def _block_bytes(qtype: str) -> tuple[int, int]:
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]


def _quantised(name: str, shape: tuple[int, ...]) -> bool:
    # routers stay F32 as llama.cpp's quantiser keeps them: tiny, and the top-k choice is sensitive
    if name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
        return False
    return len(shape) in (2, 3) and shape[-1] % 32 == 0


def _file_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A tensor's shape in the file: llama.cpp's shared-expert gate is a vector [h] (canonical [1, h])."""
    return shape[1:] if name.endswith("shared_expert_gate.weight") else shape


def _prepare(name: str, t, spec: ModelSpec):
    """A canonical tensor in llama.cpp's row order (Q/K permuted for the llama arch), as torch."""
    if spec.architecture not in _PERMUTED:
        return t
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return _permute(t, spec.n_heads)
    if name.endswith(("k_proj.weight", "k_proj.bias")):
        return _permute(t, spec.n_kv_heads)
    return t


def _encode(t, qtype: str, search: bool) -> np.ndarray:
    """A [rows, K] tensor (any float dtype; [E, rows, K] stacked experts as E*rows rows) as GGUF block
    bytes, ~4M values at a time so the float32 temporaries stay small next to the tensor itself."""
    t = t.reshape(-1, t.shape[-1])
    rows, k = t.shape
    blk, size = _block_bytes(qtype)
    out = np.empty((rows, k // blk * size), dtype=np.uint8)
    step = max(1, (4 << 20) // k)
    for r0 in range(0, rows, step):
        arr = np.ascontiguousarray(t[r0:r0 + step].float().numpy(), dtype=np.float32)
        out[r0:r0 + step] = quantize(arr, qtype, search)
    return out


def _add_experts(w, spec: ModelSpec) -> None:
    """The experts' metadata as llama.cpp reads it (each expert's FFN, the shared one's, top-k norm)."""
    w.add_expert_count(spec.n_experts)
    w.add_expert_used_count(spec.experts_per_token)
    if spec.architecture != "mixtral":
        w.add_expert_feed_forward_length(spec.expert_ffn)
        w.add_bool(f"{w.arch}.expert_weights_norm", spec.norm_topk_prob)
    if spec.shared_expert_ffn:
        w.add_expert_shared_feed_forward_length(spec.shared_expert_ffn)
    if spec.head_dim * spec.n_heads != spec.hidden_size:
        w.add_key_length(spec.head_dim)
        w.add_value_length(spec.head_dim)


def write_stream(out: str | Path, spec: ModelSpec, get, qtype: str, kv: KV, search: bool = True,
                 progress: bool = False, types: dict[str, str] | None = None) -> int:
    """Write spec's tensors (`get(name, shape)` -> torch tensor, called once each, in file order) as
    GGUF `qtype` to a temp file renamed to `out` at the end; returns the bytes of tensor data.

    The tensor infos go first (their sizes follow from the shapes), then each tensor is made,
    encoded and written before the next is asked for. `types` gives some matrices their own block
    type; `get` returns those as BlockTensors of that type, written as they are."""
    import gguf
    import torch

    from hetero.compress.artifact import remove_stale_partials
    from hetero.progress import progress_bar

    from hetero.ops.blocks import BlockTensor

    out = Path(out).expanduser()
    types = types or {}
    remove_stale_partials(out)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent)
    except OSError as e:
        raise HeteroError(f"cannot write into {out.parent}: {e.strerror or e}") from None
    os.close(fd)
    names = expected_tensors(spec)
    total = 0
    try:
        w = gguf.GGUFWriter(tmp, GGUF_ARCH[spec.architecture])
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
        if spec.is_moe:
            _add_experts(w, spec)
        main = max(set(types.values()), key=list(types.values()).count) if types else qtype
        w.add_file_type({"Q8_0": 7, "Q4_0": 2, "Q4_1": 3}[main])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value, vtype, sub in kv:
            w.add_key_value(key, value, vtype, sub)
        for name, shape in names:
            if _quantised(name, shape) or name in types:
                t_name = types.get(name, qtype)
                blk, size = _block_bytes(t_name)
                nbytes = math.prod(shape[:-1]) * (shape[-1] // blk) * size
                w.add_tensor_info(gguf_name(name), shape, np.dtype(np.float32), nbytes,
                                  raw_dtype=gguf.GGMLQuantizationType[t_name])
            else:
                w.add_tensor_info(gguf_name(name), _file_shape(name, shape), np.dtype(np.float32),
                                  4 * math.prod(shape))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        with progress_bar(f"writing {out.name}", total=sum(math.prod(s) for _, s in names),
                          enabled=progress) as advance:
            for name, shape in names:
                t = get(name, shape)
                if isinstance(t, BlockTensor):  # already blocks: only rows move (Q/K order)
                    if t.ggml_type != types.get(name) or tuple(t.shape) != tuple(shape):
                        raise HeteroError(f"{name}: {t.ggml_type} {t.shape}, expected {types.get(name)} {shape}")
                    data = np.ascontiguousarray(_prepare(name, t.data, spec).numpy())
                    w.write_tensor_data(data)
                    total += data.nbytes
                    del t, data
                    advance(math.prod(shape))
                    continue
                t = _prepare(name, t, spec)
                if tuple(t.shape) != tuple(shape):
                    raise HeteroError(f"{name}: shape {tuple(t.shape)}, expected {tuple(shape)}")
                if _quantised(name, shape):
                    data = _encode(t, qtype, search)
                else:
                    data = np.ascontiguousarray(t.to(torch.float32).numpy()).reshape(_file_shape(name, shape))
                w.write_tensor_data(data)
                total += data.nbytes
                del t, data
                advance(math.prod(shape))
        w.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would outlive the rename
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return total
