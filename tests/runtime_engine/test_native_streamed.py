"""The built-in GGUF run as stored (`native`) from the tensor cache, resident or streamed from disk:
the same greedy tokens either way (a block table left on disk reads and dequantises only its rows)."""
from __future__ import annotations

import pytest
import torch

import hetero
from hetero.runtime.engine import Engine
from tests.runtime_engine.helpers import uniform_plan

pytestmark = pytest.mark.slow
PROMPT = "What is the capital of France?"


def _run(plan):
    with Engine.load(plan, "smollm2-135m", progress=False) as e:
        return e.generate(PROMPT, max_new_tokens=8), e


def test_native_units_stream_from_disk_with_the_resident_tokens():
    spec = hetero.spec("smollm2-135m")
    want, _ = _run(uniform_plan(spec, "native"))
    # the embedding on disk (its own Q8_0 table, no longer tied), half the layers and the head too
    disk = {"embed", "head", *(f"layers.{i}" for i in range(15, 30))}
    got, e = _run(uniform_plan(spec, "native", disk=disk))
    assert got == want
    assert e.disk_embed is not None and e.disk_embed.read_bytes > 0
    assert type(e.model.net.layers[0].qkv).__name__ == "NativeLinear"
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want))
