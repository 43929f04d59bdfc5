"""A GGUF file's tensor table, read without gguf.GGUFReader.

GGUFReader turns every metadata value into numpy objects — for a tokenizer with 49k tokens and as
many merges that is ~165 MB of heap, held for as long as the reader lives, and a run that only needs
one norm vector from the file (everything else comes from the tensor cache) would pay it in its peak
footprint. This walks the header with struct, skipping metadata values, and maps only the tensor
asked for.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hetero.errors import HeteroError

# GGUF metadata value types -> struct format of a scalar (8: string, 9: array)
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]   # torch order (the file stores the fastest dimension first)
    offset: int              # absolute byte offset in the file
    nbytes: int


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        v = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return v[0] if len(v) == 1 else v

    def string(self) -> str:
        n = self.take("Q")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def skip_value(self, vtype: int) -> None:
        if vtype in _SCALAR:
            self.pos += struct.calcsize(_SCALAR[vtype])
        elif vtype == _STRING:
            n = self.take("Q")  # read first: `pos += take()` would add to the old position
            self.pos += n
        elif vtype == _ARRAY:
            etype, count = self.take("I"), self.take("Q")
            if etype in _SCALAR:
                self.pos += count * struct.calcsize(_SCALAR[etype])
            elif etype == _STRING:  # a vocabulary: ~100k strings, so one tight loop, no method calls
                buf, pos, length = self.buf, self.pos, struct.Struct("<Q").unpack_from
                for _ in range(count):
                    pos += 8 + length(buf, pos)[0]
                self.pos = pos
            else:
                for _ in range(count):
                    self.skip_value(etype)
        else:
            raise ValueError(f"unknown metadata value type {vtype}")


# ggml type -> (values per block, bytes per block) for the types read without the gguf package,
# whose import (~0.1 s: its writer, reader and vocab modules) a run of such a file then skips
_BLOCKS = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 8: (32, 34)}


def _block_size(ggml_type: int) -> tuple[int, int]:
    if ggml_type in _BLOCKS:
        return _BLOCKS[ggml_type]
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]


def tensor_table(path: Path) -> dict[str, TensorInfo]:
    """Every tensor's type, shape and absolute offset, by its GGUF name."""
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        c = _Cursor(memoryview(mm))
        if bytes(mm[:4]) != b"GGUF":
            raise HeteroError(f"{path}: not a GGUF file (bad magic)")
        c.pos = 4
        version, n_tensors, n_kv = c.take("I"), c.take("Q"), c.take("Q")
        if version < 2:
            raise HeteroError(f"{path}: GGUF version {version} is not supported")
        alignment = 32
        for _ in range(n_kv):
            key, vtype = c.string(), c.take("I")
            if key == "general.alignment" and vtype in _SCALAR:
                alignment = int(c.take(_SCALAR[vtype]))
            else:
                c.skip_value(vtype)
        raw = []
        for _ in range(n_tensors):
            name, nd = c.string(), c.take("I")
            dims = [c.take("Q") for _ in range(nd)]
            raw.append((name, c.take("I"), dims, c.take("Q")))
        data_start = (c.pos + alignment - 1) // alignment * alignment
        out = {}
        for name, qt, dims, off in raw:
            block, size = _block_size(qt)
            n = int(np.prod(dims)) if dims else 1
            out[name] = TensorInfo(name, qt, tuple(int(d) for d in reversed(dims)), data_start + off,
                                   n // block * size)
        if out and max(t.offset + t.nbytes for t in out.values()) > len(mm):
            raise HeteroError(f"{path}: truncated GGUF (tensor data runs past the end of the file)")
        return out
    except (struct.error, ValueError, KeyError) as e:
        raise HeteroError(f"{path}: truncated or corrupt GGUF ({type(e).__name__}: {e})") from None
    finally:
        del mm


def read_tensor(path: Path, info: TensorInfo) -> np.ndarray:
    """One tensor as float32 in torch's dim order (no Q/K unpermute: the caller's job)."""
    from hetero.model.gguf_dequant import dequantize

    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=info.offset, shape=(info.nbytes,))
    if info.ggml_type == 0:  # F32
        arr = np.frombuffer(mm, dtype=np.float32).copy()
    elif info.ggml_type == 1:  # F16
        arr = np.frombuffer(mm, dtype=np.float16).astype(np.float32)
    elif (fast := dequantize(mm, info.ggml_type)) is not None:
        arr = fast
    else:
        from gguf import GGMLQuantizationType, quants

        qt = GGMLQuantizationType(info.ggml_type)
        row = info.shape[-1] if info.shape else 1
        block, size = quants.GGML_QUANT_SIZES[qt]
        arr = quants.dequantize(np.asarray(mm).reshape(-1, row // block * size), qt).astype(np.float32, copy=False)
    return arr.reshape(info.shape)
