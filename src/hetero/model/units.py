"""Building one unit (embed, layers.i, head) exactly as a Plan chooses it, and the one rule for a tied
embedding. Every path that builds units — Decoder.build, the tensor cache, the engine, pipeline
stages — comes through here, so a unit built anywhere is the same module, bit for bit."""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from hetero.dtypes import BLOCK_PRECISIONS, NATIVE
from hetero.model.arch import architecture
from hetero.model.spec import ModelSpec
from hetero.ops.embedding import TiedEmbedding, make_embedding
from hetero.ops.linear import make_linear

Weights = Callable[[str], torch.Tensor]


@dataclass(frozen=True)
class UnitConfig:
    """How one unit runs: its device, precision and residency (the Plan decides; default all-CPU fp32)."""
    device: str = "cpu"
    precision: str = "fp32"
    residency: str = "resident"


def head_weight_name(spec: ModelSpec) -> str:
    return "model.embed_tokens.weight" if spec.tie_embeddings else "lm_head.weight"


def shares_head_matrix(spec: ModelSpec, embed: UnitConfig, head: UnitConfig) -> bool:
    """A tied model keeps one matrix when embed and head have the same choice and it is held in memory:
    the embedding then reads its rows from the head (the planner gives tied units one choice)."""
    return (spec.tie_embeddings and embed == head and embed.residency == "resident")


def tie_embedding(spec: ModelSpec, embed: UnitConfig, head: UnitConfig, head_module) -> TiedEmbedding | None:
    """The embedding read from the head's matrix, or None where a table of its own is needed (a layout
    that cannot be read by row, a different choice, or a streamed head)."""
    if not shares_head_matrix(spec, embed, head):
        return None
    return TiedEmbedding.tie(head_module)


def block_weights(weights: Weights, precision: str) -> Weights:
    """The weights a unit at `precision` reads: a GGUF block precision (or native) takes matrices as
    their stored blocks (BlockTensors, run or converted without a pass through floats), others floats."""
    if precision != NATIVE and precision not in BLOCK_PRECISIONS:
        return weights
    try:
        params = inspect.signature(weights).parameters
    except (TypeError, ValueError):
        params = {}
    takes_blocks = "blocks" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    if not takes_blocks:  # a plain lookup (a dict of floats): the linear layers convert
        return weights
    return functools.partial(weights, blocks=True)


def build_unit(spec: ModelSpec, weights: Weights, unit: str, cfg: UnitConfig):
    """The module of `unit`: the embedding table (a dense tensor or a QuantEmbedding), a decoder layer
    of the spec's architecture, or the head's linear layer (the final norm is the Decoder's)."""
    weights = block_weights(weights, cfg.precision)
    if unit == "embed":
        return make_embedding(weights("model.embed_tokens.weight"), cfg.precision, cfg.device)
    if unit == "head":
        return make_linear(weights(head_weight_name(spec)), None, cfg.precision, cfg.device)
    if spec.is_experts_unit(unit):
        from hetero.model.moe import build_experts

        return build_experts(spec, weights, spec.layer_index(unit), cfg)
    return architecture(spec).build_layer(spec, weights, spec.layer_index(unit), cfg)


def final_norm(weights: Weights, device: str) -> torch.Tensor:
    return weights("model.norm.weight").float().to(device)
