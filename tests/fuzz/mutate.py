"""Seeded mutations of model files: each returns (label, bytes) for a GGUF, or writes a mutated HF dir.

Mutations hit structure (counts, lengths, dims, offsets, types, special ids, templates, truncation),
never float hyper-parameters: a file whose rope theta changed is a valid, different model, while a
structural change must be refused or leave the greedy answer unchanged.
"""
from __future__ import annotations

import json
import random
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
HUGE = [0, 1, 2**31 - 1, 2**32 - 1, 2**32, 2**62, 2**64 - 1]


@dataclass
class GGUFLayout:
    """Byte positions of the structural fields of a GGUF header."""
    counts: list[tuple[int, str]] = field(default_factory=list)        # (pos, "Q") of u64 counts/lengths
    kv: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # key -> (type, value pos, value end)
    tensors: list[dict] = field(default_factory=list)                 # name, nd_pos, dims_pos, type_pos, off_pos
    header_end: int = 0


def gguf_layout(buf: bytes) -> GGUFLayout:
    lay, pos = GGUFLayout(), 8

    def u(fmt):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, buf, pos)[0]
        pos += struct.calcsize("<" + fmt)
        return v

    def string():
        nonlocal pos
        lay.counts.append((pos, "Q"))
        n = u("Q")
        s = buf[pos:pos + n]
        pos += n
        return s.decode("utf-8", "replace")

    def value(t):
        nonlocal pos
        if t in _SCALAR:
            pos += struct.calcsize(_SCALAR[t])
        elif t == 8:
            string()
        else:
            et = u("I")
            lay.counts.append((pos, "Q"))
            n = u("Q")
            for _ in range(n):
                value(et)

    lay.counts.append((pos, "Q"))
    n_t = u("Q")
    lay.counts.append((pos, "Q"))
    n_kv = u("Q")
    for _ in range(n_kv):
        k = string()
        t = u("I")
        start = pos
        value(t)
        lay.kv[k] = (t, start, pos)
    for _ in range(n_t):
        name = string()
        nd_pos = pos
        nd = u("I")
        dims_pos = pos
        pos += 8 * nd
        type_pos = pos
        u("I")
        off_pos = pos
        u("Q")
        lay.tensors.append(dict(name=name, nd=nd, nd_pos=nd_pos, dims_pos=dims_pos, type_pos=type_pos,
                                off_pos=off_pos))
    lay.header_end = pos
    return lay


def _put(buf: bytearray, pos: int, fmt: str, v: int) -> bytearray:
    b = bytearray(buf)
    struct.pack_into("<" + fmt, b, pos, v)
    return b


def gguf_mutants(orig: bytes, n: int, seed: int) -> list[tuple[str, bytes]]:
    """`n` seeded structural mutants of a GGUF file."""
    rng = random.Random(seed)
    lay = gguf_layout(orig)
    arch = "llama"
    shape_keys = [k for k in lay.kv if k.startswith(arch + ".") and lay.kv[k][0] in (4, 10)]
    id_keys = [k for k in lay.kv if k.endswith("_token_id")]
    tok_type, tok_pos, tok_end = lay.kv["tokenizer.ggml.tokens"]
    out = []
    ops = ["count", "shape", "offset", "type", "dims", "nd", "special_id", "token_bytes", "template",
           "truncate", "header_byte"]
    for i in range(n):
        op = ops[i % len(ops)] if i < len(ops) else rng.choice(ops)
        b = bytearray(orig)
        if op == "count":
            pos, fmt = rng.choice(lay.counts)
            v = rng.choice(HUGE + [struct.unpack_from("<Q", orig, pos)[0] + rng.choice([-1, 1])])
            label, b = f"count@{pos}={v}", _put(b, pos, "Q", max(0, v) % 2**64)
        elif op == "shape":
            k = rng.choice(shape_keys)
            t, p, _ = lay.kv[k]
            fmt = _SCALAR[t]
            cur = struct.unpack_from("<" + fmt, orig, p)[0]
            v = rng.choice([0, 1, cur - 1, cur + 1, cur * 2, 2**32 - 1, 1000000000])
            v = max(0, v) % (2**32 if fmt == "I" else 2**64)
            label, b = f"{k}={v}", _put(b, p, fmt, v)
        elif op == "offset":
            t = rng.choice(lay.tensors)
            cur = struct.unpack_from("<Q", orig, t["off_pos"])[0]
            v = rng.choice([0, cur + 1, max(0, cur - 1), cur + 32, max(0, cur - 32), 2**63])
            label, b = f"offset {t['name']}={v}", _put(b, t["off_pos"], "Q", v)
        elif op == "type":
            t = rng.choice(lay.tensors)
            v = rng.choice([0, 1, 2, 3, 6, 8, 12, 30, 99, 2**32 - 1])
            label, b = f"type {t['name']}={v}", _put(b, t["type_pos"], "I", v)
        elif op == "dims":
            t = rng.choice(lay.tensors)
            d = rng.randrange(t["nd"])
            p = t["dims_pos"] + 8 * d
            cur = struct.unpack_from("<Q", orig, p)[0]
            v = rng.choice([0, 1, cur + 1, cur * 2, max(1, cur // 2), 2**40, 2**63])
            label, b = f"dim{d} {t['name']}={v}", _put(b, p, "Q", v)
        elif op == "nd":
            t = rng.choice(lay.tensors)
            v = rng.choice([0, 3, 5, 2**31])
            label, b = f"nd {t['name']}={v}", _put(b, t["nd_pos"], "I", v)
        elif op == "special_id":
            k = rng.choice(id_keys)
            _, p, _ = lay.kv[k]
            v = rng.choice([512, 513, 2**31, 2**32 - 1])
            label, b = f"{k}={v}", _put(b, p, "I", v)
        elif op == "token_bytes":
            p = rng.randrange(tok_pos + 16, tok_end)
            b[p] = rng.choice([0xFF, 0xC0, 0x80, 0xFE])
            label = f"token byte@{p}"
        elif op == "template":
            _, p, end = lay.kv["tokenizer.chat_template"]
            length = end - p - 8
            bad = rng.choice(["{% for m in messages %}{{ m.content ", "{{ raise_exception('no') }}",
                              "{{ messages[99]['content'] }}", "{% if %}"])
            b[p + 8:end] = bad.ljust(length)[:length].encode()
            label = f"template {bad!r}"
        elif op == "truncate":
            cut = rng.choice([rng.randrange(4, lay.header_end), rng.randrange(lay.header_end, len(orig)),
                              len(orig) - 1])
            label, b = f"truncate@{cut}", b[:cut]
        else:  # a random byte inside the header's counts, dims, offsets or type fields
            pos, _ = rng.choice(lay.counts + [(t[k], "") for t in lay.tensors for k in ("off_pos", "type_pos")])
            p = pos + rng.randrange(8 if pos else 1)
            b[p] ^= 1 << rng.randrange(8)
            label = f"flip@{p}"
        out.append((label, bytes(b)))
    return out


# ---- HF dirs: config.json and the safetensors header ------------------------------------------------

_CONFIG_FIELDS = ["hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                  "tie_word_embeddings", "rope_scaling", "architectures", "model_type"]
_BAD_FLOATS = [0, -1, 2**63, 1e300, "1e-5", True, [], {}, float("nan"), float("inf")]
_BAD_BOOLS = [0, 1, "true", None, [], {}, float("nan")]    # True/False are both valid models
_BAD_VALUES = [0, -1, 1, 1000000000, 2**63, 1.5, "64", None, True, [], {}, [64], float("nan")]


def _st_split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack_from("<Q", data, 0)[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _st_join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def hf_mutant(src: Path, dst: Path, i: int, seed: int) -> str:
    """Write mutant number `i` of the HF dir `src` into `dst`; returns its label."""
    rng = random.Random(seed * 100003 + i)
    shutil.copytree(src, dst)
    cfg_path, st_path = dst / "config.json", dst / "model.safetensors"
    cfg = json.loads(cfg_path.read_text())
    ops = ["cfg_value", "cfg_missing", "cfg_shape", "cfg_raw", "st_dtype", "st_shape", "st_offsets",
           "st_missing", "st_truncate", "st_header_len", "st_header_raw"]
    op = ops[i % len(ops)]
    if op == "cfg_value":
        k = rng.choice(_CONFIG_FIELDS)
        # A float hyper-parameter only gets values no model has (a plausible one is a valid model).
        v = rng.choice(_BAD_FLOATS if k in ("rms_norm_eps", "rope_theta") else
                       _BAD_BOOLS if k == "tie_word_embeddings" else _BAD_VALUES)
        cfg[k] = v
        cfg_path.write_text(json.dumps(cfg))
        return f"config {k}={v!r}"
    if op == "cfg_missing":
        k = rng.choice(_CONFIG_FIELDS[:5])
        del cfg[k]
        cfg_path.write_text(json.dumps(cfg))
        return f"config without {k}"
    if op == "cfg_shape":  # a plausible shape change the tensors no longer match
        k = rng.choice(_CONFIG_FIELDS[:6])
        cfg[k] = max(1, cfg.get(k, 2) + rng.choice([-1, 1, cfg.get(k, 2)]))
        cfg_path.write_text(json.dumps(cfg))
        return f"config {k}={cfg[k]}"
    if op == "cfg_raw":
        raw = rng.choice([b"[1, 2]", b"\xff\xfe{}", b'{"hidden_size": ', b"null", b'"text"',
                          b"[" * 100000 + b"]" * 100000, json.dumps(cfg).encode()[:-5] + b"\x80\x81}"])
        cfg_path.write_bytes(raw)
        return f"config raw {raw[:20]!r}"
    data = st_path.read_bytes()
    header, body = _st_split(data)
    names = [k for k in header if k != "__metadata__"]
    t = rng.choice(names)
    if op == "st_dtype":
        v = rng.choice(["F16", "BF16", "F64", "I8", "Q4", "", 7])
        header[t]["dtype"] = v
        label = f"safetensors {t} dtype={v!r}"
    elif op == "st_shape":
        s = list(header[t]["shape"])
        j = rng.randrange(len(s))
        s[j] = rng.choice([0, s[j] + 1, s[j] * 2, 2**40, -1])
        header[t]["shape"] = s
        label = f"safetensors {t} shape={s}"
    elif op == "st_offsets":
        a, b = header[t]["data_offsets"]
        d = rng.choice([1, -1, 4, 2**40])
        header[t]["data_offsets"] = rng.choice([[a + d, b + d], [0, b - a], [a, b + d], [b, a]])
        label = f"safetensors {t} offsets={header[t]['data_offsets']}"
    elif op == "st_missing":
        del header[t]
        label = f"safetensors without {t}"
    elif op == "st_truncate":
        cut = rng.randrange(8, len(data))
        st_path.write_bytes(data[:cut])
        return f"safetensors truncated@{cut}"
    elif op == "st_header_len":
        v = rng.choice([0, 7, len(data), 2**63, struct.unpack_from("<Q", data)[0] + 1])
        st_path.write_bytes(struct.pack("<Q", v) + data[8:])
        return f"safetensors header length={v}"
    else:
        n = struct.unpack_from("<Q", data)[0]
        b = bytearray(data)
        p = 8 + rng.randrange(n)
        b[p] = rng.choice([ord("{"), ord("]"), 0xFF, ord('"'), ord("9")])
        st_path.write_bytes(bytes(b))
        return f"safetensors header byte@{p}"
    st_path.write_bytes(_st_join(header, body))
    return label
