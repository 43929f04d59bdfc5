"""LoRA on hetero's layers: PEFT loads our adapter onto transformers' model with the same logits,
gradients match PEFT's autograd, a quantised base passes input gradients, a streamed base trains
exactly as a resident one."""
from __future__ import annotations

import pytest
import torch

import hetero
from hetero.errors import HeteroError
from hetero.finetune.adapter_io import apply_adapter, load_adapter, merge, save_adapter
from hetero.finetune.lora import DEFAULT_TARGETS, LoraConfig, _Frozen, attach, dense_weight, new_parts
from hetero.finetune.step import forward_backward
from hetero.ops.linear import make_linear
from tests.model.helpers import write_tiny_checkpoint

TARGETS = ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-gqa")
    write_tiny_checkpoint("mistral_gqa", d)
    return d


@pytest.fixture
def tiny(tiny_dir):
    """The dir and a fresh transformers model of it (PEFT wraps the model it loads onto in place)."""
    import transformers

    return tiny_dir, transformers.MistralForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()


def _random_parts(spec, cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {k: (a, 0.05 * torch.randn(b.shape, generator=g)) for k, (a, b) in new_parts(spec, cfg, seed).items()}


def _batch(seed=0, B=2, T=12, V=256):
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))
    return ids, torch.cat([ids[:, 1:], torch.full((B, 1), -100)], 1)


@pytest.mark.parametrize("targets", [TARGETS, DEFAULT_TARGETS])  # a subset; every linear (the default)
def test_peft_loads_adapter_same_logits(tiny, tmp_path, targets):
    peft = pytest.importorskip("peft")
    d, ref = tiny
    m = hetero.load(str(d), dtype="fp32")
    cfg = LoraConfig(rank=4, alpha=8, targets=targets)
    save_adapter(tmp_path / "ad", m.spec, cfg, _random_parts(m.spec, cfg))
    apply_adapter(m.net, m.spec, tmp_path / "ad")   # read back from disk, as `run --adapter` does
    pm = peft.PeftModel.from_pretrained(ref, str(tmp_path / "ad")).eval()
    ids, _ = _batch()
    with torch.no_grad():
        want = pm(input_ids=ids).logits
        got = m.net(ids, 0, m.net.new_cache(2, ids.shape[1]), last_only=False)
    assert (want - got).abs().max().item() < 1e-3
    with pm.disable_adapter(), torch.no_grad():
        base = pm(input_ids=ids).logits
    assert (want - base).abs().max().item() > 1e-2  # the adapter changes the logits: the check has teeth


@pytest.mark.parametrize("checkpoint", [True, False])
def test_gradients_match_peft(tiny, tmp_path, checkpoint):
    peft = pytest.importorskip("peft")
    d, ref = tiny
    m = hetero.load(str(d), dtype="fp32")
    cfg = LoraConfig(rank=4, alpha=8, targets=TARGETS)
    parts = _random_parts(m.spec, cfg)
    attach(m.net, m.spec, cfg, parts)
    save_adapter(tmp_path / "ad", m.spec, cfg, parts)
    ids, tgt = _batch()
    n = int((tgt != -100).sum())
    nll = forward_backward(m.net, ids, tgt, float(n), checkpoint)
    pm = peft.PeftModel.from_pretrained(ref, str(tmp_path / "ad"), is_trainable=True)
    logits = pm(input_ids=ids).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                             reduction="sum")
    (loss / n).backward()
    assert abs(loss.item() - nll) < 1e-3 * n
    grads = {name: p.grad for name, p in pm.named_parameters() if p.grad is not None}
    layer = m.net.layers[1]
    ours = {"mlp.down_proj.lora_A": layer.down.A[0].grad, "self_attn.v_proj.lora_B": layer.qkv.B[1].grad}
    for key, g in ours.items():
        theirs = grads[f"base_model.model.model.layers.1.{key}.default.weight"]
        assert theirs.abs().max() > 0
        torch.testing.assert_close(g, theirs, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("precision", ["int8", "int4", "bf16"])
def test_quantised_base_input_gradient(precision):
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    lin = make_linear(w, None, precision)
    x = torch.randn(5, 64, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(5, 48, dtype=torch.bfloat16)
    _Frozen.apply(x, lin).backward(g)
    wd = dense_weight(lin).float()
    # the dequantised weight is what forward multiplies by ...
    torch.testing.assert_close(lin(x.detach()).float(), x.detach().float() @ wd.t(), rtol=2e-2, atol=5e-2)
    # ... and backward is dL/dy · W with it
    torch.testing.assert_close(x.grad.float(), g.float() @ wd, rtol=2e-2, atol=5e-2)


def test_streamed_base_trains_as_resident(tiny):
    from hetero.hardware.inventory import inventory
    from hetero.plan.make import fixed_plan
    from hetero.runtime.engine import Engine

    d, _ = tiny
    spec = hetero.spec(str(d))
    cfg = LoraConfig(rank=4, alpha=8, targets=TARGETS)
    parts = _random_parts(spec, cfg)
    ids, tgt = _batch(3)
    grads = {}
    for residency in ("resident", "disk"):
        choices = {u: ("cpu", "bf16", residency if u.startswith("layers.") or u == "head" else "resident")
                   for u in spec.unit_names()}
        plan = fixed_plan(spec, inventory(), None, choices)
        e = Engine.load(plan, str(d), progress=False, order="train")
        try:
            params = attach(e.model.net, spec, cfg, parts)
            for _ in range(2):  # two passes: the prefetch order repeats
                for p in params:
                    p.grad = None
                nll = forward_backward(e.model.net, ids, tgt, 22.0, True)
            grads[residency] = (nll, [p.grad.clone() for p in params])
            if residency == "disk":
                assert e.report()["streaming"][0]["read_bytes"] > 0
        finally:
            e.close()
    assert grads["disk"][0] == grads["resident"][0]
    for a, b in zip(grads["disk"][1], grads["resident"][1]):
        assert torch.equal(a, b)


def test_merge_equals_side_path(tiny, tmp_path):
    d, ref = tiny
    m = hetero.load(str(d), dtype="fp32")
    cfg = LoraConfig(rank=4, alpha=8, targets=TARGETS)
    parts = _random_parts(m.spec, cfg)
    tensors = {k: v.detach().float() for k, v in ref.state_dict().items()}
    merged = merge(tensors, cfg, parts)
    attach(m.net, m.spec, cfg, parts, trainable=False)
    ref.load_state_dict(merged, strict=False)
    ids, _ = _batch(5)
    with torch.no_grad():
        got = m.net(ids, 0, m.net.new_cache(2, ids.shape[1]), last_only=False)
        want = ref(input_ids=ids).logits
    assert (got - want).abs().max().item() < 1e-3


def test_adapter_for_another_model_is_refused(tiny, tmp_path):
    d, _ = tiny
    other = tmp_path / "other"
    write_tiny_checkpoint("llama", other)   # 4 kv heads: k/v shapes differ
    spec, ospec = hetero.spec(str(d)), hetero.spec(str(other))
    cfg = LoraConfig(rank=2, alpha=4, targets=("k_proj",))
    save_adapter(tmp_path / "ad", ospec, cfg, new_parts(ospec, cfg, 0))
    with pytest.raises(HeteroError, match="trained for"):
        load_adapter(tmp_path / "ad", spec)
    # without the fingerprint (a PEFT adapter from elsewhere) the shapes still say so
    from safetensors.torch import load_file, save_file

    f = tmp_path / "ad" / "adapter_model.safetensors"
    save_file(load_file(str(f)), str(f))
    with pytest.raises(HeteroError, match="another model"):
        load_adapter(tmp_path / "ad", spec)


def test_adamw_is_torchs():
    from hetero.finetune.train import AdamW

    ps = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(2)]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ours, theirs = AdamW(ps, 1e-2, weight_decay=0.1), torch.optim.AdamW(qs, 1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        for p, q in zip(ps, qs):
            p.grad = torch.randn(5, 3, generator=g)
            q.grad = p.grad.clone()
        ours.step(), theirs.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q)
