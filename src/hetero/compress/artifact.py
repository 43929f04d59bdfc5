"""Compressed models on disk: an HF-style dir (config.json with a `compression` record, safetensors,
tokenizer files) that `hetero run/eval/info` load like any HF checkpoint.

Weights are stored dequantised (fp32 by default, or bf16): every loader reads them, and quality is
measured on exactly what is stored; the record's `bytes` are the weights file's bytes (measured) and
`logical_bytes` the quantised format's size. A quantiser's grid itself is stored by the GGUF and
compressed-tensors writers (gguf_export.py, ct_export.py).
Output is written to a temporary dir beside the target and renamed into place, so an interrupted
run leaves no partial artifact.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from hetero.errors import HeteroError
from hetero.model.spec import ModelSpec, expected_tensors
from hetero.paths import pid_alive

_ARCH_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
STORE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check_exportable(spec: ModelSpec) -> None:
    """Compressed checkpoints are written as Llama-family HF dirs; Gemma 3 (its own config fields and
    norm convention) is not written yet."""
    if spec.architecture not in _ARCH_CLASS:
        raise HeteroError(f"compress writes {', '.join(_ARCH_CLASS)} checkpoints; {spec.architecture} is not "
                          "supported yet (run it at --dtype int8/int4 instead)")


def hf_config(spec: ModelSpec, record: dict | None, dtype: str = "fp32", tokenizer=None) -> dict:
    """An HF config.json dict describing `spec` (what hetero.model.hf.spec_from_config reads back)."""
    check_exportable(spec)
    cfg = {
        "architectures": [_ARCH_CLASS[spec.architecture]], "model_type": spec.architecture,
        "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.n_layers, "num_attention_heads": spec.n_heads,
        "num_key_value_heads": spec.n_kv_heads, "head_dim": spec.head_dim, "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_context, "rope_theta": spec.rope_theta,
        "rms_norm_eps": spec.norm_eps, "tie_word_embeddings": spec.tie_embeddings,
        "attention_bias": spec.attention_bias, "hidden_act": "silu",
        "torch_dtype": {"fp32": "float32", "bf16": "bfloat16"}[dtype], "_name_or_path": spec.name,
    }
    rs = spec.rope_scaling
    if rs is not None:
        cfg["rope_scaling"] = {"rope_type": rs.type, "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
                               "high_freq_factor": rs.high_freq_factor,
                               "original_max_position_embeddings": rs.original_max_position_embeddings}
    hf = getattr(tokenizer, "hf", None)
    for key in ("bos_token_id", "eos_token_id"):
        v = getattr(hf, key, None)
        if isinstance(v, int):
            cfg[key] = v
    if record is not None:
        cfg["compression"] = record
    return cfg


MARKER = ".hetero-artifact"  # written into every artifact dir: what --force may replace


def is_artifact(d: Path) -> bool:
    """A dir hetero wrote: it has the marker, or (older artifacts) a config.json with a record."""
    if (d / MARKER).is_file():
        return True
    try:
        return isinstance(json.loads((d / "config.json").read_text()).get("compression"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def remove_stale_partials(out: Path) -> None:
    """Temp dirs a killed run left beside `out` (named with that run's pid) are removed."""
    for p in out.parent.glob(f".{out.name}.partial-*"):
        pid = p.name[len(f".{out.name}.partial-"):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_output(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside `out`; on success it becomes `out` (replacing it when `force`, and
    only when `out` is an empty dir or an artifact hetero wrote)."""
    out = Path(out).expanduser().absolute()
    if out == Path.cwd() or out == out.parent:
        raise HeteroError(f"{out}: give a new directory name for the artifact, not the current or root dir")
    if out.exists() and not force:
        raise HeteroError(f"{out} already exists; choose another -o or pass --force")
    if out.exists() and not (out.is_dir() and (is_artifact(out) or not any(out.iterdir()))):
        raise HeteroError(f"{out} is not an artifact hetero wrote; --force replaces only those (remove it yourself)")
    if not out.parent.is_dir():
        raise HeteroError(f"{out.parent}: no such directory")
    remove_stale_partials(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    except OSError as e:
        raise HeteroError(f"cannot write into {out.parent}: {e.strerror or e}") from None
    try:
        yield tmp
        (tmp / MARKER).write_text("written by hetero compress\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            os.rename(tmp, out)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_hf_dir(out: str | Path, spec: ModelSpec, tensors: dict[str, torch.Tensor], record: dict | None,
                 tokenizer=None, dtype: str = "fp32", force: bool = False) -> Path:
    """Write an HF-style model dir holding `tensors` (canonical names) and the compression record."""
    from safetensors.torch import save_file

    if dtype not in STORE_DTYPES:
        raise HeteroError(f"unknown storage dtype {dtype!r}; known: {', '.join(STORE_DTYPES)}")
    names = [n for n, _ in expected_tensors(spec)]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise HeteroError(f"cannot write the artifact: tensor {missing[0]} is missing")
    data = {n: tensors[n].to(STORE_DTYPES[dtype] if tensors[n].dim() == 2 else torch.float32).contiguous()
            for n in names}
    with staged_output(out, force) as tmp:
        save_file(data, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if record is not None:  # the weights file's bytes, measured (config and tokenizer aside)
            record["bytes"] = (tmp / "model.safetensors").stat().st_size  # in place: the caller reports it
        cfg = hf_config(spec, record, dtype, tokenizer)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        hf = getattr(tokenizer, "hf", None)
        if hf is not None:
            hf.save_pretrained(str(tmp))
    return Path(out)


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to a temp file beside `path`, then rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_record(model: str | None) -> dict | None:
    """The compression record of MODEL when it is an artifact dir, else None."""
    if not model:
        return None
    p = Path(model).expanduser()
    cfg = p / "config.json" if p.is_dir() else p.parent / "config.json"
    if not cfg.exists() or p.suffix == ".gguf":
        return None
    try:
        return json.loads(cfg.read_text()).get("compression")
    except (OSError, ValueError):
        return None
