"""A linear layer that runs GGUF block formats as the file stores them (no second rounding).

The weight is a list of row segments (BlockTensors, blocks.py), each kept in its own type: a Q4_K_M
file mixes Q4_K and Q6_K rows within one fused QKV. The bytes held are the file's bytes, so decode
(bound by bytes read per token) streams exactly what the file would.

  decode, CPU with the compiled kernels  one AVX-512 GEMV per segment over the blocks as stored
                                         (kernels/blocks.h): exact weights, fp32 accumulation
  up to SMALL_M rows (a short prompt)    the row kernels: each weight's blocks read once for all rows
  prefill                                each segment dequantised exactly in bounded row blocks to
                                         x's dtype (compiled on the CPU, else blocks.dequantize_rows:
                                         the same values), then a GEMM
  CUDA                                   the same pure-torch dequantise-and-GEMM path; it has not
                                         run on a GPU.

Output is in x's dtype (fp32 or bf16; anything else computes in fp32). The compiled whole-stack
decode step reads the segments as they are (linear.gemv_operands): one GEMV per segment into its
output rows, each in its own type.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hetero.dtypes import DEQUANT_ELEMENTS
from hetero.errors import HeteroError
from hetero.ops import kernels
from hetero.ops.blocks import BlockTensor, cat_rows, dequantize_rows

SMALL_M = 32  # up to this many rows of a batched step, the compiled row kernels read each weight once for all


def merge_segments(segments: list[BlockTensor]) -> list[BlockTensor]:
    """Adjacent segments of one type fused into one (fewer GEMV calls, one stack operand)."""
    out: list[list[BlockTensor]] = []
    for s in segments:
        if out and out[-1][0].ggml_type == s.ggml_type:
            out[-1].append(s)
        else:
            out.append([s])
    return [g[0] if len(g) == 1 else cat_rows(g) for g in out]


class Segment(torch.nn.Module):
    """One block tensor held as a module (its bytes a plain tensor attribute), so the tensor cache
    snapshots it and a streamed unit's buffer binds it like any other weight."""

    def __init__(self, block: BlockTensor):
        super().__init__()
        self.data, self.ggml_type, self.shape = block.data, block.ggml_type, tuple(block.shape)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def block(self) -> BlockTensor:
        return BlockTensor(self.ggml_type, self.data, self.shape)



def each_row(forward, x: torch.Tensor) -> torch.Tensor:
    """forward over each row of x [.., M, K] alone: without the compiled row kernels, the bits a
    single-sequence step gives every row (torch's kernels block differently for M = 1 and M > 1, so
    one call over all rows would round differently), at the cost of reading W once per row."""
    m = x.shape[-2] if x.dim() >= 2 else 1
    if m <= 1:
        return forward(x)
    return torch.cat([forward(x[..., i:i + 1, :]) for i in range(m)], dim=-2)


class NativeLinear(torch.nn.Module):

    def __init__(self, segments: list[BlockTensor] | BlockTensor, bias: torch.Tensor | None = None,
                 device: str = "cpu"):
        super().__init__()
        segments = [segments] if isinstance(segments, BlockTensor) else list(segments)
        if not segments:
            raise HeteroError("a native linear layer needs at least one row segment")
        k = segments[0].shape[1]
        if any(s.shape[1] != k for s in segments):
            raise HeteroError(f"row segments of one linear layer must share K; got "
                              f"{sorted({s.shape[1] for s in segments})}")
        merged = merge_segments(segments)
        self.n_segments = len(merged)
        for i, s in enumerate(merged):
            self.add_module(f"seg{i}", Segment(s.to(device)))
        self.in_features = k
        self.out_features = sum(s.shape[0] for s in self.segments)
        if bias is not None and bias.numel() != self.out_features:
            raise HeteroError(f"bias of {bias.numel()} values for {self.out_features} output features")
        self.bias = None if bias is None else bias.to(device=device, dtype=torch.float32).reshape(-1)
        # the activation dtype's copy (bf16 units, the decode stack) is made once
        self._bias_bf16 = None if bias is None else self.bias.to(torch.bfloat16)
        cpu = torch.device(device).type == "cpu"
        self._k = kernels.get() if cpu else None
        self._kinds = [kernels.kinds()[s.ggml_type.lower()] for s in self.segments] if self._k else None

    @property
    def segments(self) -> list[BlockTensor]:
        """The row segments in output order, as BlockTensors over the child modules' bytes (seg0, ...)."""
        return [self._modules[f"seg{i}"].block() for i in range(self.n_segments)]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.segments)

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return y
        return y + (self._bias_bf16 if y.dtype == torch.bfloat16 else self.bias.to(y.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, k = x.shape, self.in_features
        dt = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32
        if self._k is not None and x.numel() == k and x.device.type == "cpu":
            xv = x.reshape(k).to(dt).contiguous()
            ys = [self._k.gemv_gguf(xv, s.data, kind, k) for s, kind in zip(self.segments, self._kinds)]
            y = ys[0] if len(ys) == 1 else torch.cat(ys)
            return self._add_bias(y).view(*shape[:-1], self.out_features)
        x2 = x.reshape(-1, k).to(dt)
        if self._k is not None and x.device.type == "cpu" and x2.shape[0] <= SMALL_M:
            # a short prompt or chunk: the row kernels read each weight once for all its rows
            # (2.8x dequantise + GEMM at 8 rows, even at ~32); single and batched paths alike
            return self._add_bias(self._rows(x2.contiguous(), False)).reshape(*shape[:-1], self.out_features)
        return self._add_bias(self.matmul(x2)).reshape(*shape[:-1], self.out_features)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 outputs of a head: one token's GEMV reads x in its own dtype (bf16 takes the bf16
        dot-product kernels where the block kind has one; Q8_0 the fp32 one) and returns the fp32 sums unrounded, so
        no bf16 rounding makes ties; several tokens (perplexity, a prompt's logits) run in fp32."""
        k = self.in_features
        if self._k is not None and x.numel() == k and x.device.type == "cpu" and x.dtype == torch.bfloat16:
            xv = x.reshape(k).contiguous()
            ys = [self._k.gemv_gguf(xv, s.data, kind, k, True) for s, kind in zip(self.segments, self._kinds)]
            y = ys[0] if len(ys) == 1 else torch.cat(ys)
            return self._add_bias(y).view(*x.shape[:-1], self.out_features)
        if (x2 := self._rows_input(x)) is not None:  # a batched step's rows, each as its GEMV above
            return self._add_bias(self._rows(x2, True)).view(*x.shape[:-1], self.out_features)
        return self(x.float())

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """The decode rows of a batched step ([.., M, K], M <= SMALL_M): each row exactly as forward
        gives it alone (the GEMV's bits), each segment's bytes read once for all (gemm_rows_gguf)."""
        if self._k is None:
            return each_row(self.forward, x)
        x2 = self._rows_input(x)
        if x2 is None:
            return self.forward(x)
        return self._add_bias(self._rows(x2, False)).view(*x.shape[:-1], self.out_features)

    def _rows_input(self, x: torch.Tensor) -> torch.Tensor | None:
        k = self.in_features
        if self._k is None or x.device.type != "cpu" or not 2 <= x.numel() // k <= SMALL_M:
            return None
        dt = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32
        return x.reshape(-1, k).to(dt).contiguous()

    def _rows(self, x2: torch.Tensor, fp32_out: bool) -> torch.Tensor:
        k = self.in_features
        ys = [self._k.gemm_rows_gguf(x2, s.data, kind, k, fp32_out) for s, kind in zip(self.segments, self._kinds)]
        return ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)

    def grouped(self, x: torch.Tensor, groups: list[tuple[int, int, bool]]) -> torch.Tensor:
        """A ragged step's rows x [1, N, K], group by group (decode rows, prefill chunks: (first, end,
        decode)) with the bits each gets alone, in fewer reads of the weight: groups of up to SMALL_M
        rows run as rows of shared row-kernel calls (each row its GEMV's bits either way), longer
        chunks share each dequantised weight block (the same per-chunk GEMMs). Eight short prompts
        prefilled together read the weight once, not eight times."""
        k = self.in_features
        if self._k is None or x.device.type != "cpu" or len(groups) < 2:
            return torch.cat([(self.rows if dec and b - a > 1 else self)(x[:, a:b]) for a, b, dec in groups], dim=1)
        dt = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32
        x2 = x.reshape(-1, k).to(dt)
        out = torch.empty(x2.shape[0], self.out_features, dtype=dt, device=x.device)
        small = torch.tensor([i for a, b, _ in groups if b - a <= SMALL_M for i in range(a, b)], dtype=torch.long)
        for c in range(0, small.numel(), SMALL_M):
            rows = small[c:c + SMALL_M]
            xr = x2[rows].contiguous()
            out[rows] = self.forward(xr) if rows.numel() == 1 else self._add_bias(self._rows(xr, False))
        long = [(a, b) for a, b, _ in groups if b - a > SMALL_M]
        if long:
            for (a, b), y in zip(long, self._matmuls([x2[a:b] for a, b in long])):
                out[a:b] = self._add_bias(y)
        return out.view(1, -1, self.out_features)

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [M, K] @ W.T in x2's dtype, dequantising DEQUANT_ELEMENTS weights at a time."""
        return self._matmuls([x2])[0]

    def _matmuls(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each x [M, K] @ W.T in its dtype, each block of W dequantised once for all of them."""
        k = self.in_features
        rows = max(16, DEQUANT_ELEMENTS // max(1, k) // 16 * 16)
        outs = [torch.empty(x2.shape[0], self.out_features, dtype=x2.dtype, device=x2.device) for x2 in xs]
        o = 0
        for j, s in enumerate(self.segments):
            kind = self._kinds[j] if self._k is not None else None
            for r in range(0, s.shape[0], rows):
                if kind is not None and xs[0].device.type == "cpu":   # compiled, the same exact values
                    w = self._k.dequant_gguf(s.data[r:r + rows], kind, k)
                else:
                    w = dequantize_rows(s.ggml_type, s.data[r:r + rows], k)
                w = w.to(xs[0].dtype)   # one dtype for all of them (a step's rows)
                for x2, out in zip(xs, outs):
                    out[:, o + r:o + r + w.shape[0]] = F.linear(x2, w)
            o += s.shape[0]
        return outs

    def dequantize_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """fp32 rows `ids` (1-D, output features) of the weight: an embedding tied to this head."""
        ids = ids.to(self.segments[0].data.device)
        if len(self.segments) == 1:
            s = self.segments[0]
            return dequantize_rows(s.ggml_type, s.data[ids], self.in_features)
        out = torch.empty(ids.numel(), self.in_features, dtype=torch.float32, device=ids.device)
        o = 0
        for s in self.segments:
            hit = (ids >= o) & (ids < o + s.shape[0])
            if hit.any():
                out[hit] = dequantize_rows(s.ggml_type, s.data[ids[hit] - o], self.in_features)
            o += s.shape[0]
        return out


class NativeEmbedding(torch.nn.Module):
    """A GGUF block table [V, row bytes]: a lookup dequantises only the rows it reads (exactly), in
    the activation dtype (bf16)."""

    def __init__(self, table: BlockTensor, device: str = "cpu", dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.table = Segment(table.to(device))
        self.rows, self.dim = table.shape
        self.dtype = dtype

    @property
    def device(self) -> torch.device:
        return self.table.data.device

    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        """Block rows [n, row_bytes] uint8 read from disk (runtime.stream.DiskEmbedding) -> values [n, dim]."""
        return dequantize_rows(self.table.ggml_type, rows, self.dim).to(self.dtype)

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).to(self.table.data.device)
        rows = dequantize_rows(self.table.ggml_type, self.table.data[flat], self.dim).to(self.dtype)
        return rows.view(*ids.shape, self.dim)
