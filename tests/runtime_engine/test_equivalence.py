"""Plans that differ only in residency (RAM, half on disk, all on disk) or prefetch give the same tokens."""
from __future__ import annotations

import pytest
import torch

import hetero
from tests.runtime_engine.helpers import everything, half, uniform_plan
from hetero.runtime.engine import Engine
from hetero.runtime.memory import cached_bytes

TINY = "synthetic:tiny"
PROMPT = "The quick brown fox jumps"


def logits_of(engine: Engine) -> torch.Tensor:
    net = engine.model.net
    ids = torch.tensor([engine.model.prompt_ids(PROMPT, chat=False)])
    cache = net.new_cache(1, ids.shape[1] + 2)
    return net(ids, 0, cache, last_only=False)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8", "int4"])
def test_residency_and_prefetch_do_not_change_tokens(precision):
    spec = hetero.spec(TINY)
    runs = {}
    for name, disk in (("ram", set()), ("half", half(spec)), ("disk", everything(spec))):
        for prefetch in ((True, False) if name == "disk" else (True,)):
            with Engine.load(uniform_plan(spec, precision, disk, prefetch=prefetch), TINY, progress=False) as e:
                runs[(name, prefetch)] = (e.generate(PROMPT, max_new_tokens=10, chat=False), logits_of(e))
                if disk:
                    assert sum(s["read_bytes"] for s in e.report()["streaming"]) > 0
    ref_ids, ref_logits = runs[("ram", True)]
    assert len(ref_ids) == 10
    for key, (ids, logits) in runs.items():
        assert ids == ref_ids, key
        assert torch.equal(logits, ref_logits), key  # bit for bit: the same tensors, the same kernels


def test_disk_units_are_streamed_not_held():
    """All on disk: the prefetch pool holds at most `depth` units, and nothing lands in the page cache."""
    spec = hetero.spec(TINY)
    with Engine.load(uniform_plan(spec, "fp32", everything(spec), depth=2), TINY, progress=False) as e:
        e.generate(PROMPT, max_new_tokens=4, chat=False)
        (pf,) = e.prefetchers
        biggest = max(spec.unit_bytes(u, "fp32") for u in spec.unit_names() if u != "embed")
        assert pf.pool_bytes <= 2 * (biggest + 64 * 4096)
        per_pass = sum(s.nbytes for s in pf.sources)
        assert pf.read_bytes >= 4 * per_pass  # prefill + 3 decode steps each read every streamed unit
        paths = {s.entry.path for s in pf.sources}
        assert pf.stats()["direct"]
        assert sum(cached_bytes(p) for p in paths) <= 4 * 4096 * len(paths)


def test_a_pass_cut_short_does_not_desynchronise_the_stream():
    spec = hetero.spec(TINY)
    with Engine.load(uniform_plan(spec, "fp32", everything(spec)), TINY, progress=False) as e:
        ref = e.generate(PROMPT, max_new_tokens=5, chat=False)
        layer0 = e.model.net.layers[0]
        calls = {"n": 0}
        real = layer0.template.forward

        def boom(*a, **k):
            calls["n"] += 1
            raise RuntimeError("interrupted")

        object.__setattr__(layer0.template, "forward", boom)
        with pytest.raises(RuntimeError):
            e.generate(PROMPT, max_new_tokens=5, chat=False)
        object.__setattr__(layer0.template, "forward", real)
        assert calls["n"] == 1
        assert e.generate(PROMPT, max_new_tokens=5, chat=False) == ref


@pytest.mark.slow
def test_smollm2_greedy_tokens_identical_across_residency():
    spec = hetero.spec("smollm2-135m")
    got = {}
    # converted once (the disk run), then every plan loads its units from the same tensor cache
    for name, disk in (("disk", everything(spec)), ("half", half(spec)), ("ram", set())):
        with Engine.load(uniform_plan(spec, "bf16", disk), "smollm2-135m", progress=False, use_cache=True) as e:
            got[name] = e.generate("What is the capital of France?", max_new_tokens=6)
    assert len(got["ram"]) >= 2
    assert got["half"] == got["ram"] and got["disk"] == got["ram"]


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_cuda_resident_ram_and_disk_units_agree(precision):
    """GPU units kept in RAM (pinned, side-stream copies) or on disk run as the resident ones do."""
    import dataclasses

    spec = hetero.spec(TINY)
    base = uniform_plan(spec, precision, device="cuda:0")
    runs = {}
    for res in ("resident", "ram", "disk"):
        units = tuple(u if u.name == "embed" else dataclasses.replace(u, residency=res) for u in base.units)
        with Engine.load(dataclasses.replace(base, units=units), TINY, progress=False) as e:
            runs[res] = e.generate(PROMPT, max_new_tokens=8, chat=False)
            if res != "resident":
                assert e.prefetchers and e.prefetchers[0].cuda
    assert runs["ram"] == runs["resident"] and runs["disk"] == runs["resident"]
