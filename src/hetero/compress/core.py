"""What every compression method works on: a model's canonical tensors held in memory (fp32), a
way to build a runnable net from them, and the byte accounting of the result.

Methods transform canonical tensors (HF Llama names, torch [out, in] order) and return new ones:
the artifact stores those, so any loader that reads HF dirs runs the compressed model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from hetero.model.decoder import Decoder
from hetero.model.units import UnitConfig
from hetero.model.spec import ModelSpec, expected_tensors

# Projections of a decoder layer: the matrices compression acts on.
LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass
class Loaded:
    """A model in memory: its spec, canonical fp32 tensors, tokenizer and where it came from."""
    spec: ModelSpec
    tensors: dict[str, torch.Tensor]
    tokenizer: object
    source: object                      # hetero.model.sources.Source
    model: str                          # what the user named
    record: dict | None = None          # the compression record, when the source is an artifact
    extra: dict = field(default_factory=dict)


def load_model(model: str | None) -> Loaded:
    """Read every canonical tensor of MODEL once, as fp32 (GGUF blocks are dequantised)."""
    import json

    from hetero.model.sources import resolve, resolve_spec
    from hetero.model.tokenizer import load_tokenizer
    from hetero.model.weights import WeightStore, required

    src = resolve(model)
    spec = resolve_spec(model)
    get = required(WeightStore(src, spec))
    tensors = {name: get(name).float() for name, _ in expected_tensors(spec)}
    record = None
    if src.kind == "hf":
        record = json.loads((src.path / "config.json").read_text()).get("compression")
    tok = load_tokenizer(src, spec.vocab_size)
    return Loaded(spec, tensors, tok, src, model or "smollm2-135m", record)


def head_name(spec: ModelSpec) -> str:
    """The head's matrix: the embedding itself when tied."""
    return "model.embed_tokens.weight" if spec.tie_embeddings else "lm_head.weight"


def linear_names(spec: ModelSpec, include_head: bool = True) -> list[str]:
    """Canonical names of the matmul weights, in execution order (layers, then the head)."""
    names = [f"model.layers.{i}.{p}.weight" for i in range(spec.n_layers) for p in LAYER_LINEARS]
    return names + [head_name(spec)] if include_head else names


def unit_linears(spec: ModelSpec, unit: str) -> list[str]:
    """The matmul weights a planner unit holds (`embed` has none: it is a lookup)."""
    if unit == "head":
        return [head_name(spec)]
    if unit.startswith("layers."):
        i = int(unit.split(".")[1])
        return [f"model.layers.{i}.{p}.weight" for p in LAYER_LINEARS]
    return []


def build_net(spec: ModelSpec, tensors: dict[str, torch.Tensor], units: dict[str, UnitConfig] | None = None,
              default: UnitConfig = UnitConfig()) -> Decoder:
    """A runnable decoder over `tensors` (fp32 by default, or per-unit precisions from `units`)."""
    def get(name: str) -> torch.Tensor:
        return tensors[name]

    return Decoder.build(spec, get, units, default)


def fp32_bytes(spec: ModelSpec) -> int:
    """Bytes of the canonical tensors held densely at fp32: the baseline of the bytes column."""
    return sum(4 * math.prod(s) for _, s in expected_tensors(spec))


def model_bytes(spec: ModelSpec, per_linear: Callable[[str, tuple[int, ...]], int],
                names: list[str]) -> int:
    """Total bytes when the matrices in `names` cost `per_linear(name, shape)` and the rest stay fp32."""
    chosen = set(names)
    return sum(per_linear(n, s) if n in chosen else 4 * math.prod(s) for n, s in expected_tensors(spec))


class one_thread:
    """Run small-op loops (GPTQ's column sweep, k-means) on one thread: on a busy machine torch's
    thread hand-offs between tiny ops cost far more than the ops (measured ~40x with 2 threads)."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)
        return False
