"""A GGUF file's tensor table, read without gguf.GGUFReader.

GGUFReader turns every metadata value into numpy objects — for a tokenizer with 49k tokens and as
many merges that is ~165 MB of heap, held for as long as the reader lives, and a run that only needs
one norm vector from the file (everything else comes from the tensor cache) would pay it in its peak
footprint. This walks the header with struct, skipping metadata values, and maps only the tensor
asked for.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hetero.errors import HeteroError

# GGUF metadata value types -> struct format of a scalar (8: string, 9: array)
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensor:
    """One entry of a GGUF file's tensor table (spec.TensorInfo describes a tensor of the model)."""
    name: str
    ggml_type: int
    shape: tuple[int, ...]   # torch order (the file stores the fastest dimension first)
    offset: int              # absolute byte offset in the file
    nbytes: int


_MAX_KEY = 1 << 16          # bytes of a metadata key or tensor name
_MAX_DIMS = 4               # GGML_MAX_DIMS
_MAX_ALIGNMENT = 1 << 16


class _Cursor:
    """Reads the header; every count and length is checked against the bytes left before use."""

    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, fmt: str):
        v = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return v[0] if len(v) == 1 else v

    def count(self, per_item: int, what: str) -> int:
        """A u64 count of items that each take at least `per_item` bytes: must fit what is left."""
        n = self.take("Q")
        if n * per_item > self.left:
            raise ValueError(f"{what} count {n} does not fit the {self.left} bytes left")
        return n

    def string(self, limit: int | None = None) -> str:
        n = self.count(1, "string length")
        if limit is not None and n > limit:
            raise ValueError(f"string of {n} bytes (most {limit})")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("a key or name is not UTF-8") from None

    def skip_value(self, vtype: int, depth: int = 0) -> None:
        if vtype in _SCALAR:
            size = struct.calcsize(_SCALAR[vtype])
            if size > self.left:
                raise ValueError("value runs past the end of the file")
            self.pos += size
        elif vtype == _STRING:
            n = self.count(1, "string length")  # read first: `pos += take()` would add to the old position
            self.pos += n
        elif vtype == _ARRAY:
            if depth > 2:
                raise ValueError("arrays nested too deep")
            etype = self.take("I")
            if etype in _SCALAR:
                size = struct.calcsize(_SCALAR[etype])
                n = self.count(size, "array")  # read first, as above
                self.pos += n * size
            elif etype == _STRING:  # a vocabulary: ~100k strings, so one tight loop, no method calls
                n = self.count(8, "array")
                buf, pos, end, length = self.buf, self.pos, len(self.buf), struct.Struct("<Q").unpack_from
                for _ in range(n):
                    if pos + 8 > end:
                        raise ValueError("a string array runs past the end of the file")
                    pos += 8 + length(buf, pos)[0]
                if pos > end:
                    raise ValueError("a string array runs past the end of the file")
                self.pos = pos
            elif etype == _ARRAY:
                for _ in range(self.count(12, "array")):
                    self.skip_value(etype, depth + 1)
            else:
                raise ValueError(f"unknown array element type {etype}")
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


def tensor_table(path: Path) -> dict[str, GGUFTensor]:
    """Every tensor's type, shape and absolute offset, by its GGUF name.

    Checked before anything is sized from it: counts fit the file, dims are bounded, offsets are
    aligned, inside the data section and tile it in order (padding only between tensors), so an
    offset set to 0, off by one, or a type changed to one of another size is refused."""
    mm = _open_mmap(path)
    try:
        c = _Cursor(memoryview(mm))
        if bytes(mm[:4]) != b"GGUF":
            raise HeteroError(f"{path}: not a GGUF file (bad magic)")
        c.pos = 4
        version = c.take("I")
        if version not in (2, 3):
            raise HeteroError(f"{path}: GGUF version {version} is not supported")
        n_tensors, n_kv = c.count(24, "tensor"), c.count(12, "metadata key")
        alignment = 32
        for _ in range(n_kv):
            key, vtype = c.string(_MAX_KEY), c.take("I")
            if key == "general.alignment" and vtype in _SCALAR:
                alignment = c.take(_SCALAR[vtype])
                if (isinstance(alignment, bool) or not isinstance(alignment, int) or
                        not 0 < alignment <= _MAX_ALIGNMENT or alignment & (alignment - 1)):
                    raise HeteroError(f"{path}: general.alignment {alignment!r} is not a power of two")
            else:
                c.skip_value(vtype)
        raw = []
        for _ in range(n_tensors):
            name, nd = c.string(_MAX_KEY), c.take("I")
            if not 1 <= nd <= _MAX_DIMS:
                raise ValueError(f"tensor {name!r} has {nd} dimensions")
            dims = [c.take("Q") for _ in range(nd)]
            raw.append((name, c.take("I"), dims, c.take("Q")))
        data_start = (c.pos + alignment - 1) // alignment * alignment
        out: dict[str, GGUFTensor] = {}
        for name, qt, dims, off in raw:
            try:
                block, size = _block_size(qt)
            except (ValueError, KeyError):
                raise HeteroError(f"{path}: tensor {name!r} has unknown type {qt}") from None
            if any(d < 1 or d > 1 << 40 for d in dims) or dims[0] % block:
                raise HeteroError(f"{path}: tensor {name!r} has invalid dims {dims} for its type")
            if name in out:
                raise HeteroError(f"{path}: tensor {name!r} appears twice")
            nbytes = math.prod(dims) // block * size
            if off % alignment or data_start + off + nbytes > len(mm):
                raise HeteroError(f"{path}: tensor {name!r} at offset {off} is misaligned or runs past the end "
                                  "of the file (truncated or corrupt)")
            out[name] = GGUFTensor(name, qt, tuple(int(d) for d in reversed(dims)), data_start + off, nbytes)
        _check_tiling(path, out, data_start, alignment, len(mm))
        return out
    except (struct.error, ValueError, KeyError, OverflowError) as e:
        raise HeteroError(f"{path}: truncated or corrupt GGUF ({type(e).__name__}: {e})") from None
    finally:
        del mm


def _check_tiling(path: Path, table: dict[str, GGUFTensor], data_start: int, alignment: int, size: int) -> None:
    """Tensors follow each other from the data start to the end of the file with only alignment
    padding between them."""
    pos = data_start
    for t in sorted(table.values(), key=lambda t: t.offset):
        if t.offset < pos:
            raise HeteroError(f"{path}: tensor {t.name!r} overlaps the tensor before it (corrupt offset or type)")
        if t.offset - pos >= alignment:
            raise HeteroError(f"{path}: {t.offset - pos} unused bytes before tensor {t.name!r} "
                              "(corrupt offset or type)")
        pos = t.offset + t.nbytes
    if table and size - pos >= alignment:
        raise HeteroError(f"{path}: {size - pos} unused bytes after the last tensor (corrupt offset or type)")


def _open_mmap(path: Path) -> np.memmap:
    import os
    import stat

    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise HeteroError(f"{path}: not a regular file")
        if st.st_size < 24:
            raise HeteroError(f"{path}: truncated GGUF ({st.st_size} bytes)")
        return np.memmap(path, dtype=np.uint8, mode="r")
    except OSError as e:
        raise HeteroError(f"{path}: cannot read ({e.strerror or e})") from None


def read_tensor(path: Path, info: GGUFTensor) -> np.ndarray:
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
