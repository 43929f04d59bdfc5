"""Each hostile model file from the 2026-12-01 campaign is one clear HeteroError at spec time
(`hetero info`), before anything is sized from it."""
from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))

import models  # noqa: E402
import mutate  # noqa: E402

from hetero.errors import HeteroError  # noqa: E402
from hetero.model.sources import resolve_spec  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    g = models.write_gguf(root / "tiny.gguf")
    return g, g.read_bytes(), mutate.gguf_layout(g.read_bytes()), models.write_hf(root / "hf")


def _patched(tmp_path, data: bytes, pos: int, fmt: str, value: int) -> str:
    b = bytearray(data)
    struct.pack_into("<" + fmt, b, pos, value)
    p = tmp_path / "m.gguf"
    p.write_bytes(bytes(b))
    return str(p)


def _refused(path, *words):
    with pytest.raises(HeteroError) as e:
        resolve_spec(str(path))
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_original_tiny_files_pass(tiny):
    g, _, _, hf = tiny
    assert resolve_spec(str(g)).n_layers == 2 and resolve_spec(str(hf)).n_layers == 2


@pytest.mark.parametrize("key,value,words", [
    ("llama.block_count", 2**32 - 1, ("n_layers", "out of range")),
    ("llama.block_count", 1, ("beyond the 1 layers",)),          # fewer layers: never a silent short model
    ("llama.attention.head_count", 0, ("n_heads", "out of range")),
    ("llama.embedding_length", 1000000000, ("hidden_size",)),
    ("tokenizer.ggml.bos_token_id", 512, ("bos_token_id",)),
])
def test_gguf_header_values(tiny, tmp_path, key, value, words):
    _, data, lay, _ = tiny
    t, pos, _ = lay.kv[key]
    _refused(_patched(tmp_path, data, pos, mutate._SCALAR[t], value), *words)


def test_gguf_array_count_of_2_62_is_refused_without_allocating(tiny, tmp_path):
    import resource

    _, data, lay, _ = tiny
    _, pos, _ = lay.kv["tokenizer.ggml.token_type"]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _refused(_patched(tmp_path, data, pos + 4, "Q", 2**62), "does not fit")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KB: < 100 MB more


@pytest.mark.parametrize("delta,words", [(None, ("overlaps",)), (1, ("misaligned",)), (32, ("unused bytes",))])
def test_gguf_tensor_offsets_zero_or_shifted(tiny, tmp_path, delta, words):
    _, data, lay, _ = tiny
    t = next(t for t in lay.tensors if t["name"] == "blk.1.ffn_up.weight")
    cur = struct.unpack_from("<Q", data, t["off_pos"])[0]
    _refused(_patched(tmp_path, data, t["off_pos"], "Q", 0 if delta is None else cur + delta), *words)


def test_gguf_embedding_type_changed(tiny, tmp_path):
    _, data, lay, _ = tiny
    t = next(t for t in lay.tensors if t["name"] == "token_embd.weight")
    _refused(_patched(tmp_path, data, t["type_pos"], "I", 2), "corrupt offset or type")  # Q8_0 -> Q4_0: a gap


def test_gguf_token_string_not_utf8(tiny, tmp_path):
    _, data, lay, _ = tiny
    _, pos, end = lay.kv["tokenizer.ggml.tokens"]
    b = bytearray(data)
    b[pos + 12 + 8] = 0xFF   # the first byte of the first token string
    p = tmp_path / "m.gguf"
    p.write_bytes(bytes(b))
    _refused(p, "UTF-8")


def test_gguf_truncated(tiny, tmp_path):
    _, data, _, _ = tiny
    p = tmp_path / "m.gguf"
    p.write_bytes(data[:-100])
    _refused(p, "truncated")


def test_fifo_is_refused_not_opened(tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    _refused(fifo, "not a regular file")


def _hf(tiny, tmp_path, cfg=None, raw=None):
    import shutil

    d = tmp_path / "hf"
    shutil.copytree(tiny[3], d)
    if raw is not None:
        (d / "config.json").write_bytes(raw)
    elif cfg is not None:
        base = json.loads((d / "config.json").read_text())
        base.update(cfg)
        (d / "config.json").write_text(json.dumps({k: v for k, v in base.items() if v != "DELETE"}))
    return d


@pytest.mark.parametrize("cfg,words", [
    ({"num_hidden_layers": 1000000000}, ("num_hidden_layers", "out of range")),
    ({"hidden_size": 1000000000}, ("hidden_size", "out of range")),
    ({"num_attention_heads": 0}, ("num_attention_heads",)),
    ({"vocab_size": "DELETE"}, ("lacks 'vocab_size'",)),
    ({"hidden_size": "64"}, ("hidden_size", "integer")),
    ({"rms_norm_eps": -1}, ("rms_norm_eps",)),
    ({"intermediate_size": 177}, ("has shape",)),
])
def test_config_schema(tiny, tmp_path, cfg, words):
    _refused(_hf(tiny, tmp_path, cfg=cfg), *words)


@pytest.mark.parametrize("raw,words", [(b"[1, 2]", ("JSON object",)), (b'{"a": "\xff"}', ("UTF-8",)),
                                       (b"[" * 100000, ("invalid JSON",))])
def test_config_not_an_object(tiny, tmp_path, raw, words):
    _refused(_hf(tiny, tmp_path, raw=raw), *words)


def _st(tiny, tmp_path, edit):
    d = _hf(tiny, tmp_path, cfg={})
    f = d / "model.safetensors"
    header, body = mutate._st_split(f.read_bytes())
    f.write_bytes(edit(header, body))
    return d


def test_safetensors_truncated(tiny, tmp_path):
    _refused(_st(tiny, tmp_path, lambda h, b: mutate._st_join(h, b[:-10])), "outside the file")


def test_safetensors_unknown_dtype(tiny, tmp_path):
    def edit(h, b):
        h["model.norm.weight"]["dtype"] = "Q4"
        return mutate._st_join(h, b)
    _refused(_st(tiny, tmp_path, edit), "unknown dtype")


def test_safetensors_shape_offset_mismatch(tiny, tmp_path):
    def edit(h, b):
        h["model.norm.weight"]["shape"] = [65]
        return mutate._st_join(h, b)
    _refused(_st(tiny, tmp_path, edit), "needs")


def test_safetensors_missing_tensor(tiny, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = _hf(tiny, tmp_path, cfg={})
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    _refused(d, "model.layers.1.mlp.up_proj.weight is missing")
