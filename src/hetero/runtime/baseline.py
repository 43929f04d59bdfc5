"""The runtime's own memory before any weights (the plan's reserve): measured in this process after
importing and warming what a run uses. Kept apart from memory.py, which only reads OS metrics."""
from __future__ import annotations

from hetero.runtime.memory import rss_bytes


def runtime_baseline(model: str | None = None) -> int:
    """Bytes the runtime itself holds before any weights: interpreter, torch and hetero's modules,
    the allocator's first arenas, the planner's first plan, and (given `model`) that model's
    tokenizer — tens of MB for a large vocabulary, held for the whole run. Measured in this process, after importing and loading
    what a run does; the planner takes it off the budget (Plan.reserve)."""
    import torch  # noqa: F401  (the imports are the point: their pages are part of the baseline)

    import hetero.model.llama  # noqa: F401
    import hetero.model.tokenizer  # noqa: F401
    import hetero.plan.make  # noqa: F401  (scipy: a run that plans holds it)
    import hetero.runtime.engine  # noqa: F401
    import hetero.runtime.generate  # noqa: F401
    import scipy.optimize  # noqa: F401  (the planner's solver loads it on first use: a planned run holds it)
    import transformers  # noqa: F401  (the tokenizer of every real model comes through it)

    _warm_forward()
    _warm_plan()
    if model is None:
        return rss_bytes()
    from hetero.model.sources import resolve, resolve_spec
    from hetero.model.tokenizer import load_tokenizer

    tok = load_tokenizer(resolve(model), resolve_spec(model).vocab_size, None)  # noqa: F841 (alive while measured)
    return rss_bytes()


def _warm_plan() -> None:
    """One plan of a tiny model on this machine's inventory (no profile: nothing is measured). The
    first plan of a process builds the solver's state and cost tables, ~4 MB that stay; measured
    without it the reserve came out that much under the process a planned run becomes."""
    from hetero.hardware.inventory import inventory
    from hetero.model.sources import resolve_spec
    from hetero.plan.make import make_plan

    from hetero.errors import HeteroError

    try:
        make_plan(resolve_spec("synthetic:tiny"), inventory(), None, memory={"cpu": 1 << 30}, prompt_tokens=8,
                  context=16)
    except HeteroError:
        pass  # a warm-up only: a machine where even this cannot be planned fails later, with its own message


def _warm_forward() -> None:
    """One prefill and one decode step of a tiny random model at every CPU precision: the first
    forward initialises thread pools, oneDNN kernels and allocator arenas, which stay for good."""
    import torch

    from hetero.model.hf import spec_from_config
    from hetero.model.decoder import Decoder
    from hetero.model.units import UnitConfig
    from hetero.model.synthetic import config

    spec = spec_from_config(config("tiny"), source="synthetic:tiny", fmt="synthetic")
    gen = torch.Generator().manual_seed(0)
    shapes = dict(__import__("hetero.model.spec", fromlist=["expected_tensors"]).expected_tensors(spec))

    def weights(name: str) -> torch.Tensor:
        return torch.randn(shapes[name], generator=gen) * 0.1

    for prec in ("fp32", "bf16", "int8", "int4"):
        net = Decoder.build(spec, weights, default=UnitConfig("cpu", prec))
        cache = net.new_cache(1, 24)
        net(torch.arange(16).view(1, 16), 0, cache)
        net(torch.tensor([[1]]), 16, cache)
