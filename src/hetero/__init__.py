"""hetero: run large language models fast on the hardware you have.

Public API:
    hetero.load(MODEL, ...) -> Model        load and run a model (Model.generate / Model.stream)
    hetero.spec(MODEL) -> ModelSpec         describe a model without reading its weights
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["load", "spec", "__version__"]


def spec(model: str = "smollm2-135m"):
    """The ModelSpec of MODEL (a .gguf path, an HF dir, `smollm2-135m`, or `synthetic:NAME`)."""
    from hetero.model.sources import resolve_spec

    return resolve_spec(model)


def load(model: str = "smollm2-135m", **kwargs):
    """Load MODEL for generation; see hetero.runtime.api.Model."""
    from hetero.runtime.api import load as _load

    return _load(model, **kwargs)
