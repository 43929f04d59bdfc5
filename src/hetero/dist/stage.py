"""One pipeline stage: a contiguous run of units (embed?, layers a..b, head?) built from only that
stage's tensors, with the same decoder code and the same arithmetic as hetero.model.llama.LlamaModel.
"""
from __future__ import annotations

import torch

from hetero.model.llama import DecoderLayer, KVCache, RotaryTable, UnitConfig, rms_norm
from hetero.model.spec import ModelSpec
from hetero.ops.linear import activation_dtype, make_linear


class StageModel:
    """Units `units` of `spec` on `device` at `precision`; reads only their tensors through `weights`."""

    def __init__(self, spec: ModelSpec, weights, units: tuple[str, ...], precision: str = "fp32",
                 device: str = "cpu"):
        self.spec, self.units, self.device = spec, tuple(units), device
        unit = UnitConfig(device, precision)
        self.dtype = activation_dtype(precision)
        self.has_embed, self.has_head = "embed" in units, "head" in units
        self.layer_ids = [int(u.split(".")[1]) for u in units if u.startswith("layers.")]
        self.embed = None
        if self.has_embed:  # a lookup table: fp32 or bf16 rows, as LlamaModel keeps it
            self.embed = weights("model.embed_tokens.weight").to(device=device, dtype=self.dtype)
        self.layers = [DecoderLayer(spec, weights, i, unit) for i in self.layer_ids]
        self.norm = self.head = None
        if self.has_head:
            self.norm = weights("model.norm.weight").float().to(device)
            head_w = weights("model.embed_tokens.weight") if spec.tie_embeddings else weights("lm_head.weight")
            self.head = make_linear(head_w, None, precision, device)
        self.rope: RotaryTable | None = None

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        if self.rope is None or self.rope.cos.shape[0] < max_len:
            self.rope = RotaryTable(self.spec, max_len)
        n = len(self.layers)
        return KVCache(self.spec, batch, max_len, [self.dtype] * n, [self.device] * n)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, start: int, cache: KVCache, want_logits: bool = True) -> torch.Tensor:
        """x: token ids [B, T] on the first stage, hidden states [B, T, h] elsewhere.
        Returns hidden states [B, T, h], or on the last stage fp32 logits of the last token [B, V]."""
        T = x.shape[1]
        if start + T > cache.max_len:
            raise ValueError(f"context overflow: {start + T} > cache length {cache.max_len}")
        if self.has_embed:
            x = self.embed[x.to(self.embed.device)]
        if self.layers:
            x = x.to(device=self.device, dtype=self.dtype)
            cos, sin = self.rope.get(start, T, self.dtype, self.device)
            for j, layer in enumerate(self.layers):
                x = layer(x, start, cos, sin, cache.k[j], cache.v[j])
        if not self.has_head:
            return x
        if not want_logits:
            return x[:, :0, :0]  # a prefill chunk that is not the prompt's last: nothing to sample
        x = rms_norm(x[:, -1:].to(self.device), self.norm, self.spec.norm_eps)
        return self.head(x).float()[:, -1]

    __call__ = forward

    def weight_bytes(self) -> int:
        """Bytes of every distinct weight tensor this stage holds (embedding, layers, norm, head)."""
        seen: dict[int, int] = {}

        def walk(obj):
            if isinstance(obj, torch.Tensor):
                if obj.numel():
                    seen[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
            elif isinstance(obj, torch.nn.Module):
                for v in vars(obj).values():
                    if isinstance(v, dict):  # _parameters, _buffers, _modules
                        for w in v.values():
                            walk(w)
                    else:
                        walk(v)
        for t in (self.embed, self.norm, self.head, *self.layers):
            if t is not None:
                walk(t)
        return sum(seen.values())



def stage_weights(source, spec: ModelSpec, units: tuple[str, ...]):
    """A `weights(name)` callable for one stage. GGUF: the stage's tensors are dequantised in one pass
    over the file (the plain store reopens it per tensor), each handed over once and then dropped."""
    from hetero.model.weights import WeightStore, required

    store = WeightStore(source, spec)
    if source.kind != "gguf":
        return required(store)
    from hetero.model.gguf import iter_tensors

    names = {t.name for u in units for t in spec.unit_tensors(u)}
    ready = {n: torch.from_numpy(a if a.flags.writeable else a.copy())
             for n, a in iter_tensors(source.path, spec, names=names)}

    def get(name: str):
        t = ready.pop(name, None)
        return t if t is not None else store(name)  # a tensor asked for twice (a tied head) reads again

    return required(get)


def rss_anon() -> int:
    """Resident anonymous memory (heap: the weights we built), without file pages mapped from the model."""
    from hetero.runtime.memory import proc_status_bytes

    anon = proc_status_bytes("RssAnon")
    if anon is not None:
        return anon
    import psutil

    m = psutil.Process().memory_info()
    return m.rss - getattr(m, "shared", 0)


def trim_heap() -> None:
    """Give freed load-time buffers back to the OS so RSS shows what the stage holds (glibc only)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
