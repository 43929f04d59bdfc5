"""The model contract: what one architecture file provides, and the registry that finds it.

Every architecture is one module under hetero.model (as mlx-lm keeps one file per model) exporting
`ARCH`, an Architecture: its names in GGUF and HF configs, and a builder per unit kind. The
assembler (model/decoder.py) and every caller that builds units (the engine, the tensor cache,
pipeline stages, hetero.load) go through `architecture(spec).build_unit`, so a new family is one file.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from hetero.errors import HeteroError

# spec.architecture -> the module that defines it (imported on first use: torch stays unloaded
# for header-only commands)
MODULES = {"llama": "hetero.model.llama", "mistral": "hetero.model.llama", "qwen2": "hetero.model.llama",
           "gemma3": "hetero.model.gemma3", "mixtral": "hetero.model.moe", "qwen2_moe": "hetero.model.moe",
           "qwen3_moe": "hetero.model.moe"}


@dataclass(frozen=True)
class Architecture:
    """One family of decoders. `build_layer(spec, weights, i, unit)` -> the module of `layers.i`;
    the embedding table and the head are the generic ones of hetero.ops unless a family says otherwise."""
    name: str
    spec_names: tuple[str, ...]          # spec.architecture values it serves (HF model_type, GGUF arch)
    build_layer: Callable
    # compile_decode(layers) -> a compiled whole-stack decode step, or None (each layer steps itself)
    compile_decode: Callable | None = None
    # embed_scale(spec) -> the factor embeddings are multiplied by, in the activation dtype (None: 1)
    embed_scale: Callable | None = None
    # from_hf(name, tensor) -> the canonical form of a tensor read from an HF checkpoint (None: as is)
    from_hf: Callable | None = None
    # whether its layers take a ragged batched step over paged KV (model/paged.py; runtime/batch.py)
    ragged: bool = False


def architecture(spec) -> Architecture:
    """The Architecture that runs `spec` (one clear error for a family without a file)."""
    mod = MODULES.get(spec.architecture)
    if mod is None:
        raise HeteroError(f"no decoder for architecture {spec.architecture!r}; supported: {', '.join(MODULES)}")
    return importlib.import_module(mod).ARCH
