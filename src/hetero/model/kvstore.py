"""KV storage in a dtype other than the layer's: int8 codes with a scale per (token, head), or a
plain cast (a bf16 cache under fp32 layers).

A store stands in for a [..., D] KV tensor: indexing that leaves the last (head) dim whole reads
the selected positions back in the layer's dtype, and assigning to such an index writes them in
the store's own format. So the layer code that writes `k_cache[:, :, start:end] = k` and reads
`k_cache[:, :, :end]` (or a paged pool's `k_pool[blocks]`) runs unchanged over any of them. The
compiled decode stack reads an Int8KV's `codes` and `scale` itself where the kernels have
DecodeStack.step_q8; otherwise an int8 cache decodes layer by layer.
"""
from __future__ import annotations

import mmap

import torch

from hetero.dtypes import check_kv_dtype

STORE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# absmax/127 in fp16; tiny heads (all ~0) keep a scale fp16 can hold, so codes stay finite
_MIN_SCALE = 2.0 ** -24


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """torch.zeros, but on the CPU backed by an anonymous mapping: the kernel hands out zeroed pages
    on first write, so a cache (or a paged pool sized for many whole contexts) is resident only as
    far as tokens have been written, not all at once (torch.zeros writes every byte)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    n = 1
    for d in shape:
        n *= d
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    if nbytes < mmap.PAGESIZE:
        return torch.zeros(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)  # private: not shared memory, so RSS only
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # a 2 MB page per layer tensor would outgrow the tokens written
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(buf, dtype=dtype).view(shape)  # the tensor keeps the mapping alive


class CastKV:
    """A KV tensor stored in `store` dtype, read back in `dtype` (the layer's)."""

    def __init__(self, shape: tuple[int, ...], store: torch.dtype, dtype: torch.dtype, device):
        self.data = zeros(shape, store, device)
        self.dtype, self.shape, self.device = dtype, self.data.shape, self.data.device

    def __getitem__(self, idx) -> torch.Tensor:
        return self.data[idx].to(self.dtype)

    def __setitem__(self, idx, value: torch.Tensor) -> None:
        self.data[idx] = value.to(self.data.dtype)

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


class Int8KV:
    """A KV tensor [..., D] as int8 codes [..., D] and fp16 scales [..., 1]: symmetric absmax over
    the head dim, so each (token, head) row is one code vector times one scale. Costs D + 2 bytes
    a row against bf16's 2D (D = 64: 0.52x)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device):
        self.codes = zeros(shape, torch.int8, device)
        self.scale = zeros((*shape[:-1], 1), torch.float16, device)
        self.dtype, self.shape, self.device = dtype, self.codes.shape, self.codes.device

    def __getitem__(self, idx) -> torch.Tensor:
        # the product in fp32, then each value rounds once to the layer's dtype, as a bf16 cache's do
        # (a bf16 scale would round the whole row by one factor, up to 2^-8: a bias, not noise)
        return (self.codes[idx].float() * self.scale[idx].float()).to(self.dtype)

    def __setitem__(self, idx, value: torch.Tensor) -> None:
        codes, scale = quantize_rows(value)
        self.codes[idx] = codes
        self.scale[idx] = scale

    def nbytes(self) -> int:
        return self.codes.numel() + self.scale.numel() * self.scale.element_size()


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 codes [..., D], fp16 scales [..., 1]) with x ~= codes * scale. The codes
    are rounded against the fp16 scale that is stored, so dequantising sees the same scale."""
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / 127.0).clamp_min(_MIN_SCALE).to(torch.float16)
    codes = torch.round(xf / scale.float()).clamp_(-127, 127).to(torch.int8)
    return codes, scale


def new_store(shape: tuple[int, ...], kv_dtype: str, dtype: torch.dtype, device):
    """One K or V tensor of `shape` for a layer computing in `dtype`: a plain tensor when the cache
    is held in that dtype ("auto", or the same dtype named), else a store."""
    check_kv_dtype(kv_dtype)
    if kv_dtype == "int8":
        return Int8KV(shape, dtype, device)
    store = STORE_DTYPES.get(kv_dtype, dtype)
    if store == dtype:
        return zeros(shape, dtype, device)
    return CastKV(shape, store, dtype, device)


def nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else t.nbytes()
