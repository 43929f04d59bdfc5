"""The one assembler: units (embed, layers.i, head) -> a decoder that runs them in order.

    net = Decoder.build(spec, weights, {"layers.3": UnitConfig("cpu", "int8")})   # from weights
    net = Decoder.from_units(spec, modules, configs, norm)                         # from built units

Both hetero.load and the engine (tensor-cache entries, resident or streamed) end in `from_units`;
a pipeline stage is a Decoder over a contiguous subset of the units (no embed: it takes hidden
states; no head: it returns them). Each unit may sit on its own device and precision; activations
move at device boundaries. Shapes: B batch, T new tokens, V vocabulary, h hidden size.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from hetero.errors import HeteroError
from hetero.model.arch import architecture
from hetero.model.llama import KVCache, RotaryTable, rms_norm
from hetero.model.paged import PagedKV, Ragged, Segment
from hetero.model.spec import ModelSpec
from hetero.model.units import UnitConfig, build_unit, final_norm, tie_embedding
from hetero.ops.linear import activation_dtype


class Decoder(torch.nn.Module):
    """Embedding -> decoder layers -> norm -> head, or a contiguous part of it (a pipeline stage)."""

    def __init__(self, spec: ModelSpec, units: dict[str, UnitConfig], embed, layers: list, norm, head):
        super().__init__()
        self.spec, self.units = spec, units
        self.embed = embed                      # indexable table (tensor, QuantEmbedding, TiedEmbedding, DiskEmbedding) or None
        self.layers = torch.nn.ModuleList(layers)
        self.norm, self.head = norm, head       # both None on a stage without the head
        self.has_embed, self.has_head = "embed" in units, "head" in units
        self.embed_dtype = activation_dtype(units["embed"].precision) if self.has_embed else None
        self.head_device = units["head"].device if self.has_head else None
        self.rope: RotaryTable | None = None
        # Families with local layers (Gemma 3) rotate those with their own base: a second table.
        self.rope_local: RotaryTable | None = None
        self.layer_ids = [spec.layer_index(u) for u in units if _is_layer(spec, u)]
        scale = architecture(spec).embed_scale
        self.embed_scale = scale(spec) if scale is not None and self.has_embed else None
        # The compiled decode stack and the layers it was built from (rebuilt when `layers` change).
        # stack_decode = False: each layer runs its own decode step (the stack's reference).
        self.stack_decode = True
        # How new caches hold K/V (dtypes.KV_DTYPES): "auto" in each layer's dtype, int8 about half
        # of bf16's bytes (the engine sets the plan's; the compiled stack reads "auto" caches only).
        self.kv_dtype = "auto"
        self._stack: tuple[list, object | None] | None = None

    # ---- assembly --------------------------------------------------------------------------------
    @classmethod
    def from_units(cls, spec: ModelSpec, modules: dict[str, object], units: dict[str, UnitConfig],
                   norm: torch.Tensor | None) -> "Decoder":
        """Assemble built units. `modules` holds every unit of `units`; the embedding may be left out
        where model.units.tie_embedding gives a view of the head's matrix (the one rule for ties)."""
        names = [u for u in spec.unit_names() if u in units]
        _check_contiguous(spec, names)
        embed = modules.get("embed")
        if "embed" in units and embed is None and "head" in units:
            embed = tie_embedding(spec, units["embed"], units["head"], modules["head"])
        if "embed" in units and embed is None:
            raise ValueError("the embedding unit has no table: build one where tie_embedding() gives None")
        layers = [modules[u] for u in names if _is_layer(spec, u)]
        for u in names:
            if spec.is_experts_unit(u):  # a MoE layer's routed experts: its own unit, run inside it
                from hetero.model.moe import attach_experts

                attach_experts(modules[u.rsplit(".", 1)[0]], modules[u])
        return cls(spec, {u: units[u] for u in names}, embed, layers, norm, modules.get("head"))

    @classmethod
    def build(cls, spec: ModelSpec, weights: Callable[[str], torch.Tensor | None],
              units: dict[str, UnitConfig] | None = None, default: UnitConfig = UnitConfig(),
              names: list[str] | tuple[str, ...] | None = None) -> "Decoder":
        """Build units straight from the weights: all of them, or the contiguous subset `names`."""
        units = units or {}
        names = [u for u in spec.unit_names() if names is None or u in names]
        cfg = {u: units.get(u, default) for u in names}
        modules: dict[str, object] = {}
        for u in names:
            if u == "embed" and "head" in cfg and spec.tie_embeddings and cfg["embed"] == cfg["head"]:
                continue  # built after the head, from its matrix when the layout allows
            modules[u] = build_unit(spec, weights, u, cfg[u])
        if "embed" in cfg and "embed" not in modules:
            if tie_embedding(spec, cfg["embed"], cfg["head"], modules["head"]) is None:
                modules["embed"] = build_unit(spec, weights, "embed", cfg["embed"])
        norm = final_norm(weights, cfg["head"].device) if "head" in cfg else None
        return cls.from_units(spec, modules, cfg, norm)

    # ---- running ---------------------------------------------------------------------------------
    def _decode_stack(self) -> object | None:
        """The compiled stack for the current layers (rebuilt if `layers` changed), or None. Not used
        while a layer has hooks (per-unit timings hook each layer's forward)."""
        layers = list(self.layers)
        if self._stack is None or self._stack[0] != layers:
            compile_decode = architecture(self.spec).compile_decode
            self._stack = (layers, compile_decode(layers) if compile_decode else None)
        if any(layer._forward_hooks or layer._forward_pre_hooks for layer in layers):
            return None
        return self._stack[1]

    def _ensure_rope(self, max_len: int) -> None:
        spec = self.spec
        if self.rope is None or self.rope.cos.shape[0] < max_len:
            self.rope = RotaryTable(spec, max_len)
            if spec.rope_local_theta is not None:
                local = dataclasses.replace(spec, rope_theta=spec.rope_local_theta, rope_scaling=None)
                self.rope_local = RotaryTable(local, max_len)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        spec = self.spec
        self._ensure_rope(max_len)
        dtypes = [layer.dtype for layer in self.layers]
        devices = [layer.device for layer in self.layers]
        # a local layer's cache holds its window only (a ring: model/gemma3.py)
        lengths = [spec.layer_kv_tokens(i, max_len) for i in self.layer_ids]
        return KVCache(spec, batch, max_len, dtypes, devices, lengths, self.kv_dtype)

    def new_paged(self, n_blocks: int, block: int, kv_dtype: str | None = None) -> PagedKV:
        """Paged KV for ragged steps (forward_ragged); runtime/kvcache.KVPool sizes and hands it out."""
        if not architecture(self.spec).ragged:
            raise HeteroError(f"batched decode does not run {self.spec.architecture} models yet; "
                              "run one sequence at a time")
        if not (self.has_embed and self.has_head):
            raise HeteroError("batched decode runs a whole model, not a pipeline stage")
        self._ensure_rope(min(n_blocks * block, self.spec.max_context))  # no sequence goes past either
        return PagedKV(self.spec, n_blocks, block, [layer.dtype for layer in self.layers],
                       [layer.device for layer in self.layers], self.kv_dtype if kv_dtype is None else kv_dtype)

    def _rows_stack(self, kv: PagedKV) -> object | None:
        """The compiled stack when a ragged step over `kv` may run through it, else None: it reads
        plain K/V pools (int8 or cast stores run layer by layer in torch)."""
        plain = all(isinstance(t, torch.Tensor) for t in kv.k + kv.v)
        return self._decode_stack() if self.stack_decode and self.layers and plain else None

    def chunks_as_rows(self, kv: PagedKV) -> bool:
        """Whether forward_ragged(chunks_as_rows=True) can take prefill chunks as rows of the stack."""
        return self._rows_stack(kv) is not None

    @torch.inference_mode()
    def forward_ragged(self, ids: torch.Tensor, r: Ragged, kv: PagedKV, want: torch.Tensor | None = None,
                       chunks_as_rows: bool = False) -> torch.Tensor:
        """One step of several sequences: ids [N] the step's tokens packed segment after segment
        (r: their positions and blocks). Returns fp32 logits [n, V] at the last token of each
        segment, or of the segments indexed by `want` (a prefill chunk that is not a prompt's last
        has nothing to sample).

        chunks_as_rows: every prefill token is one more row of the compiled stack's step, as a
        decode row is (the stack writes every row's K/V before any row attends, so a chunk's token
        at position p sees exactly keys 0..p). One call and one read of the weights for the whole
        step: a short chunk beside decoding streams costs its rows' compute, not a layer-by-layer
        pass. The chunk's rows round as decode rows do, not as the chunk's GEMMs alone would."""
        if ids.numel() != r.n_tokens:
            raise ValueError(f"{ids.numel()} ids for a step of {r.n_tokens} tokens")
        self._ensure_rope(int(r.positions.max()) + 1)
        x = self.embed[ids.reshape(1, -1).to(self.embed.device)]                     # [1, N, h]
        if self.embed_scale is not None:
            x = x.to(self.embed_dtype)
            x = x * torch.tensor(self.embed_scale, dtype=torch.float32).to(device=x.device, dtype=x.dtype)
        stack = self._rows_stack(kv)
        if stack is not None and r.chunks and chunks_as_rows:
            rows = Ragged([Segment(s.start + i, 1, s.blocks) for s in r.segments for i in range(s.length)], r.block)
            x = self._hidden(x, rows, kv, stack)
        elif stack is not None and r.chunks and r.decode_blocks is not None:
            x = self._split_hidden(x, r, kv, stack)
        else:
            x = self._hidden(x, r, kv, stack if not r.chunks else None)
        rows = r.last_rows if want is None else r.last_rows[want]
        x = x[:, rows.to(x.device)].to(self.head_device)                              # [1, n, h]
        x = rms_norm(x, self.norm, self.spec.norm_eps)
        # each row as the single path's head gives it one token (its GEMV's bits), the weight read once
        if hasattr(self.head, "logits"):   # GGUF blocks: fp32 logits, unrounded
            return self.head.logits(x)[0].float()
        return getattr(self.head, "rows", self.head)(x).float()[0]

    def _hidden(self, x: torch.Tensor, r: Ragged, kv: PagedKV, stack) -> torch.Tensor:
        # x: [1, N, h] -> after every layer. Decode rows only with a stack: every layer in one
        # compiled call over the paged KV (each row the bits the one-token stack gives it);
        # otherwise layer by layer
        if stack is not None:
            first = self.layers[0]
            x = x.to(device=first.device, dtype=first.dtype)
            cos, sin = self.rope.at(r.positions, first.dtype, first.device)
            return stack.step_rows(x[0].contiguous(), r.positions, cos.contiguous(), sin.contiguous(), kv.k, kv.v,
                                   r.decode_blocks)[None]
        tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, layer in enumerate(self.layers):
            if x.device != torch.device(layer.device) or x.dtype != layer.dtype:
                x = x.to(device=layer.device, dtype=layer.dtype)
            rd = r.on(layer.device)
            key = (layer.dtype, layer.device)
            if key not in tables:
                tables[key] = self.rope.at(rd.positions, layer.dtype, layer.device)
            x = layer(x, 0, *tables[key], kv.k[i], kv.v[i], ragged=rd)
        return x

    def _split_hidden(self, x: torch.Tensor, r: Ragged, kv: PagedKV, stack) -> torch.Tensor:
        # A step of decode rows and prefill chunks: the decode rows through the stack, the chunks
        # layer by layer, so a decoding sequence gets the same bits whether or not a prompt is being
        # prefilled beside it (the layer-by-layer attention over padded blocks rounds otherwise).
        # The chunks' GEMMs are compute-bound: their second read of the weights costs little.
        starts, row = [], 0
        for s in r.segments:
            starts.append(row)
            row += s.length
        dec = [i for i, s in enumerate(r.segments) if s.length == 1]
        chk = [i for i, s in enumerate(r.segments) if s.length > 1]
        out = None
        for part, use in ((dec, stack), (chk, None)):
            idx = torch.cat([torch.arange(starts[i], starts[i] + r.segments[i].length) for i in part])
            y = self._hidden(x[:, idx.to(x.device)], Ragged([r.segments[i] for i in part], r.block), kv, use)
            if out is None:
                out = torch.empty(1, r.n_tokens, y.shape[-1], dtype=y.dtype, device=y.device)
            out[:, idx.to(out.device)] = y.to(out.dtype)
        return out

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, start: int, cache: KVCache, last_only: bool = True,
                want_logits: bool = True) -> torch.Tensor:
        """x: token ids [B, T] (with the embedding) or hidden states [B, T, h] (a later stage), at
        positions start..start+T-1. Returns fp32 logits [B, V] (last_only) or [B, T, V] with the head,
        else hidden states [B, T, h]. want_logits=False on the head: a prefill chunk that is not the
        prompt's last, nothing to sample (an empty tensor)."""
        B, T = x.shape[0], x.shape[1]
        if start + T > cache.max_len:
            raise ValueError(f"context overflow: {start + T} > cache length {cache.max_len}")
        if self.has_embed:
            x = self.embed[x.to(self.embed.device)]
            if self.embed_scale is not None:  # in the activation dtype, the factor rounded to it (as HF)
                x = x.to(self.embed_dtype)
                x = x * torch.tensor(self.embed_scale, dtype=torch.float32).to(device=x.device, dtype=x.dtype)
        if self.layers:
            # the stack reads plain caches and int8 ones (codes + scales); a cast cache goes layer by layer
            kind = getattr(cache, "kind", "plain")
            stack = self._decode_stack() if B == T == 1 and self.stack_decode and kind != "cast" else None
            if stack is not None and kind == "int8" and not hasattr(stack, "step_q8"):
                stack = None  # kernels built before int8 KV
            if stack is not None:  # one decode step: every layer in one compiled call
                first = self.layers[0]
                x = x.to(device=first.device, dtype=first.dtype)
                cs = self.rope.get(start, 1, first.dtype, first.device)
                if kind == "int8":
                    x = stack.step_q8(x, start, *cs, [k.codes for k in cache.k], [k.scale for k in cache.k],
                                      [v.codes for v in cache.v], [v.scale for v in cache.v])
                else:
                    x = stack.step(x, start, *cs, cache.k, cache.v)
            else:
                tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # cos/sin per (dtype, device, local)
                for i, layer in enumerate(self.layers):
                    if x.device != torch.device(layer.device) or x.dtype != layer.dtype:
                        x = x.to(device=layer.device, dtype=layer.dtype)  # cuda:0 -> cuda:1 moves too
                    local = self.rope_local is not None and self.spec.is_sliding(self.layer_ids[i])
                    key = (layer.dtype, layer.device, local)
                    if key not in tables:
                        tables[key] = (self.rope_local if local else self.rope).get(start, T, layer.dtype, layer.device)
                    x = layer(x, start, *tables[key], cache.k[i], cache.v[i])
        if not self.has_head:
            return x
        if not want_logits:
            return x[:, :0, :0]
        if last_only:
            x = x[:, -1:]
        x = x.to(self.head_device)
        fp32_head = hasattr(self.head, "logits")   # GGUF blocks: unrounded fp32 logits, no bf16 ties
        if fp32_head and x.shape[0] * x.shape[1] > 1:
            x = x.float()   # several tokens (perplexity, a prompt): the norm and the GEMM in fp32
        x = rms_norm(x, self.norm, self.spec.norm_eps)
        logits = self.head.logits(x) if fp32_head else self.head(x).float()
        return logits[:, -1] if last_only else logits


def _is_layer(spec: ModelSpec, unit: str) -> bool:
    """A decoder layer's unit (`layers.i`), not a MoE layer's experts unit."""
    return unit.startswith("layers.") and not spec.is_experts_unit(unit)


def _check_contiguous(spec: ModelSpec, names: list[str]) -> None:
    order = spec.unit_names()
    idx = [order.index(u) for u in names]
    if not idx or idx != list(range(idx[0], idx[0] + len(idx))):
        raise ValueError(f"units must be a contiguous run of {spec.name}'s units, got {names}")
    # a MoE layer and its experts unit run as one: a stage holds both or neither
    if spec.is_experts_unit(names[0]) or (spec.is_moe and _is_layer(spec, names[-1])):
        raise ValueError(f"a MoE layer and its experts go together; got {names[0]}..{names[-1]}")
