"""A tensor cache shared by a process with compiled kernels and one without (HETERO_KERNELS=0, or
another CPU) keeps each one's packing apart: both runs give the same greedy tokens, neither crashes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hetero.ops import kernels

ROOT = Path(__file__).resolve().parents[2]
CHILD = """
import json, sys
import hetero
from hetero.ops import kernels
from hetero.runtime.engine import Engine
from tests.runtime_engine.helpers import uniform_plan

spec = hetero.spec("smollm2-135m")
out = {"kernels": kernels.get() is not None}
for precision in ("int4", "int8"):
    with Engine.load(uniform_plan(spec, precision), "smollm2-135m", progress=False) as e:
        out[precision] = e.generate("The capital of France is", max_new_tokens=8, chat=False)
print(json.dumps(out))
"""


def run(cache: Path, **env) -> dict:
    e = {**os.environ, "HETERO_CACHE": str(cache), **env}
    r = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # the real model, converted twice (~1 min)
@pytest.mark.skipif(kernels.get() is None, reason="compiled kernels unavailable here")
def test_kernel_and_torch_layouts_share_a_cache(tmp_path):
    fast = run(tmp_path)
    torch_only = run(tmp_path, HETERO_KERNELS="0")
    assert fast["kernels"] and not torch_only["kernels"]
    for precision in ("int4", "int8"):
        assert len(fast[precision]) == 8
        assert torch_only[precision] == fast[precision], precision
        # one entry per layout: the torch run wrote its own instead of reading the kernels' one
        heads = list((tmp_path / "tensors").rglob(f"head.{precision}.cpu.*.bin"))
        layouts = {json.loads(p.read_bytes()[16:16 + int.from_bytes(p.read_bytes()[8:16], "little")])["key"]["layout"]
                   for p in heads}
        assert layouts == {kernels.LAYOUT, "torch"}
