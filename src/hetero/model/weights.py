"""Tensor access by canonical name: GGUF (dequantised through the gguf package) or safetensors (mmap).

Never unpickles: safetensors and GGUF are plain data formats.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from hetero.errors import HeteroError
from hetero.model.sources import Source
from hetero.model.spec import ModelSpec


class WeightStore:
    """`store(name)` -> float tensor in torch dim order (fp32 for GGUF, the stored dtype otherwise).

    `store(name, blocks=True)` hands a GGUF matrix stored in a block format the engine runs natively
    (hetero.ops.blocks.NATIVE_TYPES) as a BlockTensor of its bytes as stored, so nothing is
    rounded twice; other tensors come as floats either way."""

    def __init__(self, source: Source, spec: ModelSpec):
        self.source, self.spec = source, spec
        self._gguf_table: dict | None = None
        self._files: dict[str, Path] = {}
        if source.kind == "gguf":
            self._read = self._read_gguf
        else:
            d = source.path
            if source.kind == "synthetic":
                from hetero.model.synthetic import ensure_weights

                d = ensure_weights(source.name)
            from hetero.model.hf import read_safetensors_header, safetensors_files

            for f in safetensors_files(d):
                for name in read_safetensors_header(f):
                    if name != "__metadata__":
                        self._files[name] = f
            self._read = self._read_safetensors

    def __call__(self, name: str, blocks: bool = False):
        if blocks and self.source.kind == "gguf":
            return self._read_gguf(name, blocks=True)
        return self._read(name)

    def _raw(self, name: str) -> torch.Tensor | None:
        from safetensors import safe_open

        f = self._files.get(name)
        if f is None:
            return self._stacked(name)
        with safe_open(str(f), framework="pt") as fh:
            return fh.get_tensor(name)

    def _read_safetensors(self, name: str) -> torch.Tensor | None:
        f = self._files.get(name)
        if f is None:
            prefix = name[:-len("weight")]
            if name.endswith(".weight") and prefix + "weight_packed" in self._files:
                from hetero.model import ct

                return ct.dequantize(self._raw, prefix)  # compressed-tensors pack-quantized
            return self._stacked(name)
        t = self._raw(name)
        from hetero.model.arch import architecture

        # a family whose HF tensors differ from hetero's canonical form converts them here (Gemma's norms)
        from_hf = architecture(self.spec).from_hf
        return t if from_hf is None else from_hf(name, t)

    def _stacked(self, name: str) -> torch.Tensor | None:
        """A canonical MoE tensor an HF checkpoint holds per expert: its experts stacked [E, ...]
        (or the router under Mixtral's name)."""
        from safetensors import safe_open

        from hetero.model.moe_names import hf_parts

        parts = hf_parts(name, self._files, self.spec.n_experts) if self.spec.is_moe else None
        if parts is None:
            return None
        out = []
        for part in parts:
            with safe_open(str(self._files[part]), framework="pt") as fh:
                out.append(fh.get_tensor(part))
        return out[0] if len(out) == 1 and not self.spec.is_expert_tensor(name) else torch.stack(out)

    def _read_gguf(self, name: str, blocks: bool = False):
        # One tensor at a time, on first use, through the light tensor table (gguf_index: no
        # GGUFReader, whose metadata objects would cost ~165 MB of heap for one norm vector).
        from hetero.model.gguf import canonical_name, unpermute
        from hetero.model.gguf_index import read_tensor, tensor_table

        if self._gguf_table is None:
            self._gguf_table = {c: t for n, t in tensor_table(self.source.path).items()
                                if (c := canonical_name(n, self.spec.architecture)) is not None}
        info = self._gguf_table.get(name)
        if info is None:
            return None
        # a MoE layer's stacked experts [E, rows, K] come as the blocks of all E*rows rows
        if blocks and len(info.shape) in (2, 3) and (bt := self._blocks(name, info)) is not None:
            return bt
        try:
            arr = read_tensor(self.source.path, info)
        except (ValueError, IndexError, NotImplementedError) as e:
            raise HeteroError(f"{self.source.path}: cannot read tensor {info.name} ({e})") from None
        return torch.from_numpy(unpermute(name, arr, self.spec))

    def _blocks(self, name: str, info):
        """The matrix's blocks as stored ([N, row bytes] uint8, Q/K rows unpermuted: a row permutation
        moves whole rows of blocks, so it is exact), or None for a type not run natively."""
        from gguf import GGMLQuantizationType

        from hetero.model.gguf import unpermute
        from hetero.ops.blocks import NATIVE_TYPES, BlockTensor

        try:
            qtype = GGMLQuantizationType(info.ggml_type).name
        except ValueError:
            return None
        if qtype not in NATIVE_TYPES:
            return None
        n, k = math.prod(info.shape[:-1]), info.shape[-1]
        if info.nbytes % n:
            raise HeteroError(f"{self.source.path}: tensor {info.name} holds {info.nbytes} bytes, not {n} rows")
        mm = np.memmap(self.source.path, dtype=np.uint8, mode="r", offset=info.offset, shape=(info.nbytes,))
        rows = np.array(mm).reshape(n, info.nbytes // n)
        return BlockTensor(qtype, torch.from_numpy(unpermute(name, rows, self.spec)), (n, k))


def required(store: Callable[[str], torch.Tensor | None]) -> Callable[[str], torch.Tensor]:
    """Wrap a store so a missing tensor is a clear error rather than a None deep in the model."""

    def get(name: str, **kw) -> torch.Tensor:
        t = store(name, **kw)
        if t is None:
            raise HeteroError(f"weights lack tensor {name!r}")
        return t

    return get
