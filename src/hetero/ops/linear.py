"""Linear layers at each compute precision, built once from a float weight.

The decoder only calls `layer(x)`; which kernel runs is decided here, by the precision the plan
gives the unit. Quantised kernels take bf16 activations (torch's CPU int8/int4 weight-only kernels
are fast with bf16 and slow with fp32 inputs; see DESIGN.md).

Off the CPU (CUDA) int8 and int4 run torch's weight-only kernels (the ones the profile times) when a
check at build time shows they compute what the dequantised weight does; otherwise the weight is
dequantised to bf16 in bounded blocks per call (pure torch, so the same code runs on CPU tensors).
The CUDA branches have not run on a GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hetero.dtypes import DEQUANT_ELEMENTS, INT4_GROUP
from hetero.errors import HeteroError
from hetero.ops import kernels
from hetero.ops.blocks import BlockTensor, QUANTIZABLE, quantize_blocks
from hetero.ops.native import SMALL_M, NativeLinear, each_row, merge_segments

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# GGUF block formats run as stored (ops/native.py): "native" keeps each segment's own type; a type
# name converts every segment (and a float weight) to that type.
BLOCK_PRECISIONS: tuple[str, ...] = ("q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k")

# Device kinds whose units this engine builds; the cost model also prices mps and xpu (what-if plans).
RUNNABLE_KINDS: tuple[str, ...] = ("cpu", "cuda")


def check_device(device: str) -> str:
    """`device` when the engine can build units there, else a HeteroError naming what it can."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise HeteroError(f"unknown device {device!r}") from None
    if kind not in RUNNABLE_KINDS:
        raise HeteroError(f"units on {device} are not supported by this engine (it runs "
                          f"{' and '.join(RUNNABLE_KINDS)} units); plan them elsewhere")
    return device


def on_cpu(device: str) -> bool:
    """Kernels are chosen by the planned device, not by where a tensor happens to sit, so a unit
    built for cuda takes the CUDA branch wherever its tensors are (runtime.devices.simulated_cuda)."""
    return torch.device(device).type == "cpu"


def _gemv_input(x: torch.Tensor, k: int, out: torch.dtype = torch.bfloat16) -> torch.Tensor | None:
    """x as the compiled GEMVs take it when it is one token (decode), else None: K contiguous fp32
    or bf16 values (the GEMV widens bf16 itself and returns y in x's dtype). A bf16 x is passed as is
    only when the output is wanted in bf16 anyway (`out`); otherwise it is widened first."""
    if x.numel() != k or x.device.type != "cpu":
        return None
    if x.is_contiguous() and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 == out)):
        return x
    return x.reshape(k).to(torch.float32).contiguous()


# SMALL_M (ops/native.py): up to this many decode rows (a batched step) the compiled row kernels read W once for all


def _rows_input(x: torch.Tensor, k: int, pad: int) -> torch.Tensor | None:
    """x as the compiled small-M kernels take it: [M, K (+pad)] fp32 for 2 <= M <= SMALL_M on the CPU,
    else None (M = 1 is the GEMV's; more rows take forward's GEMM)."""
    if x.device.type != "cpu" or not 2 <= x.numel() // k <= SMALL_M:
        return None
    x2 = x.reshape(-1, k).to(torch.float32)
    return (F.pad(x2, (0, pad)) if pad else x2).contiguous()


def _as(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return y if y.dtype == dtype else y.to(dtype)


def activation_dtype(precision: str) -> torch.dtype:
    """The dtype activations flow in for a unit of this precision."""
    return torch.float32 if precision == "fp32" else (torch.float16 if precision == "fp16" else torch.bfloat16)


class DenseLinear(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, precision: str, device: str = "cpu"):
        super().__init__()
        dt = DTYPES[precision]
        self.weight = weight.to(device=device, dtype=dt).contiguous()
        self.bias = None if bias is None else bias.to(device=device, dtype=dt)
        self.out_features, self.in_features = self.weight.shape
        # Decode (M = 1) goes through the compiled GEMV when there is one: it streams the weight
        # faster than torch's stock matrix-vector kernel (docs/BENCHMARKS.md, "CPU speed").
        self._gemv = None
        if on_cpu(device) and self.in_features % 16 == 0 and (k := kernels.get()):
            self._gemv = {torch.float32: k.gemv_f32, torch.bfloat16: k.gemv_bf16}.get(dt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gemv is not None and (xv := _gemv_input(x, self.in_features, self.weight.dtype)) is not None:
            y = _as(self._gemv(xv, self.weight), self.weight.dtype)
            if self.bias is not None:
                y = y + self.bias
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """As Int8Linear.rows: each row's bits as forward's GEMV gives it alone, W read once for all."""
        xr = _rows_input(x, self.in_features, 0) if self._gemv is not None else None
        if xr is None:
            return self.forward(x)
        y = kernels.get().gemm_rows_dense(xr, self.weight).to(self.weight.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: w ≈ q * scale[:, None]."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(torch.nn.Module):
    """Weight-only int8 per output channel; bf16 activations through torch._weight_int8pack_mm
    (CPU; CUDA when its check passes, else the weight dequantised in blocks)."""
    act_int8 = False  # set by ops.actquant.act_int8: prefill with per-token int8 activations (W8A8)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, device: str = "cpu"):
        super().__init__()
        q, scale = quantize_int8_per_channel(weight)
        # torch's CPU int8 kernel reads K in blocks of 16 and misbehaves (NaN, even a crash) otherwise.
        self.pad = (-q.shape[1]) % 16
        if self.pad:
            q = F.pad(q, (0, self.pad))
        self.qweight = q.to(device).contiguous()          # [N, K] int8
        self.scales = scale.to(device=device, dtype=torch.bfloat16)  # [N]
        self.bias = None if bias is None else bias.to(device=device, dtype=torch.bfloat16)
        self.out_features, self.in_features = q.shape[0], q.shape[1] - self.pad
        self._fast = on_cpu(device) or _kernel_agrees(
            lambda x: torch._weight_int8pack_mm(x, self.qweight, self.scales),
            lambda x: _dequant_linear(x, _dequant_int8, self.qweight, self.scales), self.qweight)
        self._gemv = kernels.get() if on_cpu(device) else None
        # The compiled GEMV takes the same bf16-rounded scales, widened to fp32.
        self._scales_f32 = self.scales.float() if self._gemv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self._gemv is not None and (xv := _gemv_input(x, self.in_features)) is not None:
            if self.pad:
                xv = F.pad(xv.reshape(-1), (0, self.pad))
            y = _as(self._gemv.gemv_int8(xv, self.qweight, self._scales_f32), torch.bfloat16)
            if self.bias is not None:
                y = y + self.bias
            return y.view(*shape[:-1], self.out_features)
        if self.act_int8:
            from hetero.ops.actquant import int8_linear_w8a8

            return int8_linear_w8a8(self, x)
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if self.pad:
            x2 = F.pad(x2, (0, self.pad))
        x2 = x2.contiguous()
        if self._fast:
            y = torch._weight_int8pack_mm(x2, self.qweight, self.scales)
        else:
            y = _dequant_linear(x2, _dequant_int8, self.qweight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """The decode rows of a batched step ([.., M, K], M <= SMALL_M): each row exactly as forward
        gives it alone (the GEMV's bits), the weight read once for all (gemm_rows.cpp)."""
        if self._gemv is None:
            return each_row(self.forward, x)
        xr = _rows_input(x, self.in_features, self.pad)
        if xr is None:
            return self.forward(x)
        y = self._gemv.gemm_rows_int8(xr, self.qweight, self._scales_f32).to(torch.bfloat16)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


def quantize_int4_groupwise(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise int4 along the input dim: w ≈ (q - 8) * scale + zero_point_offset.

    Returns q (uint8 in [0, 15], [N, K]), scale and zero ([N, K/group]) in torch's int4-kernel
    convention: w = (q - 8) * scale + zero. K must be a multiple of `group` (callers pad).
    """
    w = weight.float()
    n, k = w.shape
    wg = w.reshape(n, k // group, group)
    lo, hi = wg.amin(dim=2), wg.amax(dim=2)
    scale = ((hi - lo) / 15.0).clamp(min=1e-8)
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15)
    zero = lo + 8.0 * scale  # so that (q - 8) * scale + zero == q * scale + lo
    return q.reshape(n, k).to(torch.uint8), scale, zero


class Int4Linear(torch.nn.Module):
    """Weight-only group-wise int4 with bf16 activations.

    `layout` says how the weight is held (all hold half a byte plus a bf16 scale and zero per group):
      rows      our nibble layout, row by row: in each group's g/2 bytes, byte i = q[i] | q[i + g/2] << 4;
                scales_zeros [N, K/g, 2]. Read by the compiled AVX-512 GEMV at decode and dequantised
                to bf16 for a GEMM at prefill (CPU, group 32), or dequantised in blocks per call
                (off the CPU when torch's kernel is missing or disagrees).
      torch-cpu torch._weight_int4pack_mm_for_cpu's packing (CPU without the compiled kernels, N a
                multiple of 16 as that kernel needs; otherwise the rows layout dequantised).
      tinygemm  torch._weight_int4pack_mm's packing (CUDA; the kernel the profile times), used only
                when a check at build time matches it against the rows layout dequantised.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, device: str = "cpu", group: int = INT4_GROUP):
        super().__init__()
        n, k = weight.shape
        pad = (-k) % group
        if pad:  # a dimension the group does not divide is zero-padded, never skipped
            weight = F.pad(weight.float(), (0, pad))
        q, scale, zero = quantize_int4_groupwise(weight, group)
        self.group, self.in_features, self.out_features, self.pad = group, k, n, pad
        self.bias = None if bias is None else bias.to(device=device, dtype=torch.bfloat16)
        cpu = on_cpu(device)
        self._k = kernels.get() if cpu and group == 32 else None
        if cpu and self._k is None and n % 16 == 0:
            # torch CPU packing wants int32 [N, K] values in [0, 15]; scales_and_zeros is [K/g, N, 2] bf16.
            self.layout = "torch-cpu"
            self.packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
            self.scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
            return
        self.layout = "rows"
        qg = q.reshape(n, -1, 2, group // 2)
        self.packed = (qg[:, :, 0] | (qg[:, :, 1] << 4)).reshape(n, -1).contiguous().to(device)  # [N, K/2]
        self.scales_zeros = torch.stack([scale, zero], dim=-1).to(torch.bfloat16).contiguous().to(device)
        if not cpu:
            tg = _tinygemm_pack(q, self.scales_zeros, group, device)
            if tg is not None and _kernel_agrees(
                    lambda x: torch._weight_int4pack_mm(x, tg[0], group, tg[1]),
                    lambda x: _dequant_linear(x, dequant_int4_rows, self.packed, self.scales_zeros), self.packed):
                self.layout, self.packed, self.scales_zeros = "tinygemm", tg[0], tg[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xv = _gemv_input(x, self.in_features) if self._k is not None else None
        if xv is not None:
            if self.pad:
                xv = F.pad(xv.reshape(-1), (0, self.pad))
            y = _as(self._k.gemv_int4(xv, self.packed, self.scales_zeros), torch.bfloat16)
        else:
            x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
            if self.pad:
                x2 = F.pad(x2, (0, self.pad))
            x2 = x2.contiguous()
            if self._k is not None:  # prefill: a bf16 GEMM is compute-bound, so dequantising first is cheap
                y = _dequant_linear(x2, self._k.dequant_int4, self.packed, self.scales_zeros)
            elif self.layout == "torch-cpu":
                y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self.scales_zeros)
            elif self.layout == "tinygemm":
                y = torch._weight_int4pack_mm(x2, self.packed, self.group, self.scales_zeros)
            else:
                y = _dequant_linear(x2, dequant_int4_rows, self.packed, self.scales_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """As Int8Linear.rows: each row's bits as forward gives it alone (bf16 activations take the
        GEMV's bf16 dot-product kernel, as forward's GEMV does)."""
        if self._k is None:
            return each_row(self.forward, x)
        xr = _rows_input(x, self.in_features, self.pad)
        if xr is None:
            return self.forward(x)
        y = self._k.gemm_rows_int4(xr, self.packed, self.scales_zeros, x.dtype == torch.bfloat16).to(torch.bfloat16)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def dequant_int4_rows(packed: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
    """The rows layout ([n, K/2] uint8, [n, K/g, 2] bf16) -> bf16 [n, K], in fp32 arithmetic as the
    compiled kernel does; pure torch, so it runs wherever the tensors are."""
    n, groups = scales_zeros.shape[0], scales_zeros.shape[1]
    g = packed.reshape(n, groups, -1)
    q = torch.cat([g & 15, g >> 4], dim=-1).float()                      # [n, G, g]
    sz = scales_zeros.float()
    return ((q - 8.0) * sz[..., :1] + sz[..., 1:]).reshape(n, -1).to(torch.bfloat16)


def _dequant_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.to(torch.bfloat16) * scales[:, None]


def _tinygemm_pack(q: torch.Tensor, scales_zeros: torch.Tensor, group: int, device: str):
    """(packed, scales_and_zeros [K/g, N, 2]) for torch._weight_int4pack_mm on `device`, or None when
    torch cannot pack this shape there. The packer takes two nibbles per byte, the even one high."""
    k = q.shape[1]
    tiles = next((t for t in (8, 4, 2) if k % (16 * t) == 0), None)
    if tiles is None or q.shape[0] % 8:
        return None
    try:
        u8 = ((q[:, 0::2] << 4) | q[:, 1::2]).to(torch.uint8).contiguous().to(device)
        return torch._convert_weight_to_int4pack(u8, tiles), scales_zeros.transpose(0, 1).contiguous()
    except (RuntimeError, NotImplementedError, AttributeError):
        return None


def _kernel_agrees(kernel, reference, weight: torch.Tensor) -> bool:
    """True when `kernel(x)` runs on the weight's device and matches `reference(x)` (the weight
    dequantised) on random bf16 input within bf16 rounding; a kernel torch lacks here is False."""
    k = weight.shape[1] * (2 if weight.dtype == torch.uint8 else 1)
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(0)).to(device=weight.device, dtype=torch.bfloat16)
    try:
        got, ref = kernel(x).float(), reference(x).float()
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    return bool(torch.isfinite(got).all()) and float((got - ref).norm() / ref.norm().clamp(min=1e-6)) < 2e-2


# Dequantising paths handle DEQUANT_ELEMENTS weights at a time (hetero.dtypes): bounds the transient
# to ~6 MB instead of the whole matrix (a 1B model's gate/up: ~140 MB).


def _dequant_linear(x2: torch.Tensor, dequant, packed: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
    """x2 @ dequant(W).T, dequantising W one block of output rows at a time (on x2's device)."""
    n, k = packed.shape[0], x2.shape[1]
    rows = max(16, DEQUANT_ELEMENTS // max(1, k) // 16 * 16)
    if n <= rows:
        return F.linear(x2, dequant(packed, scales_zeros))
    out = torch.empty(x2.shape[0], n, dtype=torch.bfloat16, device=x2.device)
    for r in range(0, n, rows):
        out[:, r:r + rows] = F.linear(x2, dequant(packed[r:r + rows], scales_zeros[r:r + rows]))
    return out


def gemv_operands(lin: torch.nn.Module) -> tuple | None:
    """(kind, weight, scales, bias) of a linear layer as the compiled decode stack reads it (empty
    tensors for none), or None when its decode does not run through a compiled GEMV. A GGUF layer of
    several types gives lists (kinds, weights): its row segments in output order, one GEMV each.
    The kind codes come from the compiled module itself (kernels.kinds()), which is loaded whenever
    a layer has a GEMV."""
    none = torch.empty(0)
    if type(lin) is DenseLinear and lin._gemv is not None:
        kind = kernels.kinds()["fp32" if lin.weight.dtype == torch.float32 else "bf16"]
        return kind, lin.weight, none, none if lin.bias is None else lin.bias
    if type(lin) is Int8Linear and lin._gemv is not None:
        return kernels.kinds()["int8"], lin.qweight, lin._scales_f32, none if lin.bias is None else lin.bias
    if type(lin) is Int4Linear and lin._k is not None:
        return kernels.kinds()["int4"], lin.packed, lin.scales_zeros, none if lin.bias is None else lin.bias
    if type(lin) is NativeLinear and lin._k is not None:
        bias = none if lin.bias is None else lin._bias_bf16
        segs = lin.segments
        if len(segs) == 1:
            return lin._kinds[0], segs[0].data, none, bias
        return list(lin._kinds), [s.data for s in segs], none, bias
    return None


def _segments(weight) -> list[BlockTensor] | None:
    """A weight's row segments when it is held as GGUF blocks, else None (a float tensor)."""
    if isinstance(weight, BlockTensor):
        return [weight]
    if isinstance(weight, (list, tuple)):
        if not all(isinstance(w, BlockTensor) for w in weight):
            raise HeteroError("a segmented weight must be a list of BlockTensors")
        return list(weight)
    return None


def _dequantized(weight) -> torch.Tensor:
    segs = _segments(weight)
    if segs is None:
        return weight
    return torch.cat([s.dequantize() for s in segs])


def to_block_type(weight, ggml_type: str) -> list[BlockTensor]:
    """The weight's segments all in `ggml_type`: segments already of it are kept as they are, the
    rest (and float weights) dequantised exactly and quantised with the reference rounding."""
    segs = _segments(weight)
    parts = segs if segs is not None else [weight]
    out = []
    for p in parts:
        if isinstance(p, BlockTensor) and p.ggml_type == ggml_type:
            out.append(p)
            continue
        if ggml_type not in QUANTIZABLE:
            raise HeteroError(f"cannot quantise to {ggml_type} here (hetero quantises to "
                              f"{', '.join(QUANTIZABLE)}); use precision native or one of those")
        out.append(quantize_blocks(p.dequantize() if isinstance(p, BlockTensor) else p, ggml_type))
    return out


def cat_rows(weights: list) -> "torch.Tensor | list[BlockTensor]":
    """Weights stacked along the output rows (a fused QKV or gate_up): float tensors are torch.cat'd;
    GGUF blocks stay blocks, as a list of row segments (adjacent ones of one type fused). A mix of
    float and block weights is dequantised (exactly) and cat'd as floats."""
    if all(isinstance(w, torch.Tensor) for w in weights):
        return torch.cat(weights)
    if any(isinstance(w, torch.Tensor) for w in weights):
        return torch.cat([_dequantized(w) for w in weights])
    segs = [s for w in weights for s in _segments(w)]
    return merge_segments(segs)


def make_linear(weight, bias: torch.Tensor | None, precision: str, device: str = "cpu") -> torch.nn.Module:
    """The layer for `weight` (a float tensor [N, K], a BlockTensor, or a list of BlockTensor row
    segments) at `precision`. "native" runs GGUF blocks in their own types (a float weight has none:
    bf16); a block type name converts to that type; the other precisions dequantise blocks first."""
    check_device(device)
    segs = _segments(weight)
    if precision == "native":
        return NativeLinear(segs, bias, device) if segs is not None else DenseLinear(weight, bias, "bf16", device)
    if precision in BLOCK_PRECISIONS:
        return NativeLinear(to_block_type(weight, precision.upper()), bias, device)
    if segs is not None:
        weight = _dequantized(weight)
    if precision in DTYPES:
        return DenseLinear(weight, bias, precision, device)
    if precision == "int8":
        return Int8Linear(weight, bias, device)
    if precision == "int4":
        return Int4Linear(weight, bias, device)
    raise ValueError(f"unknown precision {precision!r}")
