"""Mixtral, Qwen2-MoE and Qwen3-MoE equal transformers on tiny random checkpoints (fp32, max abs logit
error <= 1e-4): prefill, cached decode and greedy tokens; the same weights written as a llama.cpp-style
GGUF (merged [E, ...] expert tensors, written here with the gguf package) give the same logits. Also
the spec's view of experts (bytes apart, top-k FLOPs) and the other precisions on the same executor."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import hetero
from hetero.model.hf import spec_from_hf_dir

TOL = 1e-4
V = 260   # room for the byte-level vocabulary a GGUF needs (hetero.compress.gguf_export)
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")


def write_tiny(out, family: str, seed: int = 0):
    """A random 2-layer model of `family` saved as an HF dir (per-expert tensors, as transformers
    saves them); weights scaled so activations and routing are O(1). Returns the model (fp32, eval)."""
    import transformers

    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=V, max_position_embeddings=256)
    if family == "mixtral":
        cfg = transformers.MixtralConfig(**base, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2)
        cls = transformers.MixtralForCausalLM
    elif family == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(**base, intermediate_size=96, num_experts=8, num_experts_per_tok=2,
                                          moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                          norm_topk_prob=False)
        cls = transformers.Qwen2MoeForCausalLM
    else:
        cfg = transformers.Qwen3MoeConfig(**base, intermediate_size=96, num_experts=8, num_experts_per_tok=3,
                                          moe_intermediate_size=32, norm_topk_prob=True)
        cls = transformers.Qwen3MoeForCausalLM
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    model.save_pretrained(str(out), safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (HF dir, transformers model), each written once for the module."""
    made: dict = {}

    def get(family: str):
        if family not in made:
            d = tmp_path_factory.mktemp(family)
            made[family] = (d, write_tiny(d, family))
        return made[family]

    return get


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf permutation of Q/K rows for arch llama (interleaved RoPE pairs)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_dir, family: str, path) -> None:
    """The HF dir as llama.cpp lays it out: arch llama (+ expert_count) for Mixtral, qwen2moe,
    qwen3moe; experts merged into blk.N.ffn_{gate,up,down}_exps [E, ...]; router ffn_gate_inp."""
    import gguf
    from safetensors.numpy import load_file

    from hetero.model.hf import read_config

    cfg = read_config(hf_dir)
    st = load_file(str(hf_dir / "model.safetensors"))
    arch = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}[family]
    E = cfg.get("num_experts") or cfg["num_local_experts"]
    w = gguf.GGUFWriter(str(path), arch)
    h, heads, kvh = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(h)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kvh)
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_expert_count(E)
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    if family != "mixtral":
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        w.add_bool(f"{arch}.expert_weights_norm", cfg["norm_topk_prob"])
    if family == "qwen2_moe":
        w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    from hetero.compress.gguf_export import byte_vocab_kv

    for key, value, vtype, sub in byte_vocab_kv(cfg["vocab_size"]):
        w.add_key_value(key, value, vtype, sub)
    w.add_tensor("token_embd.weight", st["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", st["model.norm.weight"])
    w.add_tensor("output.weight", st["lm_head.weight"])
    proj = ({"gate": "w1", "up": "w3", "down": "w2"} if family == "mixtral"
            else {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"})
    moe = "block_sparse_moe" if family == "mixtral" else "mlp"
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for n, g in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"), ("o", "attn_output")):
            t = st[p + f"self_attn.{n}_proj.weight"]
            if arch == "llama" and n in "qk":
                t = _permute(t, heads if n == "q" else kvh)
            w.add_tensor(f"blk.{i}.{g}.weight", t)
            if p + f"self_attn.{n}_proj.bias" in st:
                w.add_tensor(f"blk.{i}.{g}.bias", st[p + f"self_attn.{n}_proj.bias"])
        w.add_tensor(f"blk.{i}.attn_norm.weight", st[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", st[p + "post_attention_layernorm.weight"])
        if family == "qwen3_moe":
            w.add_tensor(f"blk.{i}.attn_q_norm.weight", st[p + "self_attn.q_norm.weight"])
            w.add_tensor(f"blk.{i}.attn_k_norm.weight", st[p + "self_attn.k_norm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", st[p + f"{moe}.gate.weight"])
        for g, n in proj.items():
            w.add_tensor(f"blk.{i}.ffn_{g}_exps.weight",
                         np.stack([st[p + f"{moe}.experts.{j}.{n}.weight"] for j in range(E)]))
        if family == "qwen2_moe":
            for g in ("gate", "up", "down"):
                w.add_tensor(f"blk.{i}.ffn_{g}_shexp.weight", st[p + f"mlp.shared_expert.{g}_proj.weight"])
            w.add_tensor(f"blk.{i}.ffn_gate_inp_shexp.weight", st[p + "mlp.shared_expert_gate.weight"][0])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _check_parity(net, ref, ids, prompt_len: int) -> None:
    with torch.no_grad():
        want = ref(ids).logits[0]                                             # [T, V]
    cache = net.new_cache(1, ids.shape[1])
    got = net(ids[:, :prompt_len], 0, cache, last_only=False)[0]
    assert (got - want[:prompt_len]).abs().max().item() <= TOL
    for pos in range(prompt_len, ids.shape[1]):                               # cached decode steps
        got = net(ids[:, pos:pos + 1], pos, cache)[0]
        assert (got - want[pos]).abs().max().item() <= TOL, f"decode at {pos}"


def _greedy(net, prompt: torch.Tensor, n: int) -> list[int]:
    cache = net.new_cache(1, prompt.shape[1] + n)
    logits, out = net(prompt, 0, cache), []
    for pos in range(prompt.shape[1], prompt.shape[1] + n):
        out.append(int(logits[0].argmax()))
        logits = net(torch.tensor([[out[-1]]]), pos, cache)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_transformers_from_hf_and_from_gguf(tiny, tmp_path, family):
    hf_dir, ref = tiny(family)
    ids = torch.randint(0, V, (1, 12), generator=torch.Generator().manual_seed(1))
    net = hetero.load(str(hf_dir), dtype="fp32").net
    assert net.spec.architecture == family and net.spec.is_moe
    _check_parity(net, ref, ids, prompt_len=9)
    prompt = ids[:, :5]
    with torch.no_grad():
        want = ref.generate(prompt, max_new_tokens=6, do_sample=False)[0, 5:].tolist()
    assert _greedy(net, prompt, 6) == want
    # the same weights from a llama.cpp-layout GGUF
    gguf_path = tmp_path / "m.gguf"
    write_gguf(hf_dir, family, gguf_path)
    gnet = hetero.load(str(gguf_path), dtype="fp32").net
    assert gnet.spec.architecture == family
    assert (gnet.spec.n_experts, gnet.spec.experts_per_token, gnet.spec.intermediate_size,
            gnet.spec.shared_expert_ffn, gnet.spec.norm_topk_prob) == \
           (net.spec.n_experts, net.spec.experts_per_token, net.spec.intermediate_size,
            net.spec.shared_expert_ffn, net.spec.norm_topk_prob)
    _check_parity(gnet, ref, ids, prompt_len=9)


def test_spec_sees_experts_apart(tiny):
    spec = spec_from_hf_dir(tiny("qwen2_moe")[0])
    E, k, f, fs, h = 8, 2, 32, 48, 64
    assert (spec.n_experts, spec.experts_per_token, spec.expert_ffn, spec.shared_expert_ffn) == (E, k, f, fs)
    gate = next(t for t in spec.tensors if t.name == "model.layers.0.mlp.experts.gate_proj.weight")
    assert gate.shape == (E, f, h) and gate.nbytes == E * f * h * 4   # 8 per-expert tensors folded into one
    # layer 0 is two units: its dense part, then its routed experts
    assert spec.unit_names()[1:5] == ["layers.0", "layers.0.experts", "layers.1", "layers.1.experts"]
    assert len(spec.unit_names()) == 2 * spec.n_layers + 2
    assert spec.unit_expert_bytes("layers.0.experts", "fp32") == 3 * E * f * h * 4
    assert spec.unit_bytes("layers.0.experts", "bf16") == 3 * E * f * h * 2
    assert spec.unit_expert_bytes("layers.0", "fp32") == spec.unit_expert_bytes("embed", "fp32") == 0
    dense = spec.unit_bytes("layers.0", "fp32")
    assert dense > 0 and dense == 4 * sum(np.prod(t.shape) for t in spec.tensors
                                          if t.name.startswith("model.layers.0.") and ".experts." not in t.name)
    assert spec.unit_expert_fraction("layers.0.experts") == 1.0 and spec.unit_expert_fraction("layers.0") == 0.0
    # one token runs k experts; a long prompt touches ~all of them
    assert spec.experts_touched(1) == pytest.approx(k)
    assert E - 0.01 < spec.experts_touched(512) <= E
    attn = 4 * h * h // 1 - 2 * h * (h - spec.kv_dim)   # q, o: h x h; k, v: h x kv
    assert spec.layer_matmul_params() == attn + h * E + (3 * h * fs + h) + k * 3 * h * f
    # decode reads the dense part and k of E experts; a 512-token pass nearly all of them
    from hetero import cost

    full = spec.unit_bytes("layers.0.experts", "fp32")
    assert cost.read_bytes(spec, "layers.0.experts", full, 1) == pytest.approx(full * k / E)
    assert cost.read_bytes(spec, "layers.0.experts", full, 512) == pytest.approx(full, rel=1e-3)
    dense = spec.unit_bytes("layers.0", "fp32")
    assert cost.read_bytes(spec, "layers.0", dense, 1) == dense   # the dense part is read whole
    # the FLOPs split the same way: the experts unit's are k routed experts
    assert spec.unit_flops_per_token("layers.0.experts", 10) == 2 * k * 3 * h * f
    assert (spec.unit_flops_per_token("layers.0", 10) + spec.unit_flops_per_token("layers.0.experts", 10)
            == pytest.approx(2 * spec.layer_matmul_params() + 4 * spec.n_heads * spec.head_dim * 10))


@pytest.mark.parametrize("precision,rel", [("bf16", 0.05), ("int8", 0.05), ("int4", 0.35)])
def test_other_precisions_follow_fp32(tiny, precision, rel):
    d = str(tiny("qwen3_moe")[0])
    ids = torch.randint(0, V, (1, 10), generator=torch.Generator().manual_seed(3))
    a = hetero.load(d, dtype="fp32").net
    b = hetero.load(d, dtype=precision).net
    la, lb = a(ids, 0, a.new_cache(1, 10)), b(ids, 0, b.new_cache(1, 10))
    assert (la - lb).abs().max() < rel * la.abs().max()


def test_expert_bank_groups_tokens_as_a_loop_per_token_would():
    from hetero.ops.experts import ExpertBank

    g = torch.Generator().manual_seed(0)
    E, f, h, N, k = 5, 12, 16, 9, 2
    gate, up, down = torch.randn(E, f, h, generator=g), torch.randn(E, f, h, generator=g), torch.randn(E, h, f, generator=g)
    bank = ExpertBank(gate, up, down, E, "fp32", "cpu")
    x = torch.randn(N, h, generator=g)
    index = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    weight = torch.rand(N, k, generator=g)
    want = torch.zeros(N, h)
    for n in range(N):
        for j in range(k):
            e = int(index[n, j])
            want[n] += weight[n, j] * (down[e] @ (torch.nn.functional.silu(gate[e] @ x[n]) * (up[e] @ x[n])))
    torch.testing.assert_close(bank(x, index, weight), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name,total,active", [("mixtral-8x7b", 46.7, 12.9), ("qwen3-30b-a3b", 30.5, 3.3),
                                               ("olmoe-1b-7b", 6.9, 1.3)])
def test_synthetic_shapes_have_the_published_sizes(name, total, active):
    """Billions of parameters, in all and per token, as the model cards give them."""
    from hetero.model.sources import resolve_spec

    spec = resolve_spec(f"synthetic:{name}")
    assert spec.is_moe
    assert spec.n_params / 1e9 == pytest.approx(total, rel=0.01)
    per_token = spec.n_layers * spec.layer_matmul_params() + 2 * spec.hidden_size * spec.vocab_size
    assert per_token / 1e9 == pytest.approx(active, rel=0.03)


def test_qwen3_30b_a3b_plans_on_a_catalog_machine():
    from hetero.hardware.catalog import resolve
    from hetero.model.sources import resolve_spec
    from hetero.plan import make_plan

    spec = resolve_spec("synthetic:qwen3-30b-a3b")
    p = make_plan(spec, resolve("catalog:rtx4090+ram64g+nvme"), None, {"cuda:0": 24 * 10**9}, explain=False)
    assert p.solver["status"] == "optimal" and p.predicted.decode_tok_s > 0
    assert len(p.units) == 2 * spec.n_layers + 2


def test_tiny_synthetic_moe_runs_and_caches():
    """synthetic:tiny-moe is written, loaded and run: a cached decode step equals the prefill's logits."""
    net = hetero.load("synthetic:tiny-moe", dtype="fp32").net
    assert net.spec.is_moe and net.spec.architecture == "qwen3_moe"
    ids = torch.randint(0, 512, (1, 7), generator=torch.Generator().manual_seed(4))
    whole = net(ids, 0, net.new_cache(1, 7))
    cache = net.new_cache(1, 7)
    net(ids[:, :6], 0, cache)
    torch.testing.assert_close(net(ids[:, 6:], 6, cache), whole, atol=1e-5, rtol=0)


HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


def _llama_cpp_logits(path, ids: list[int]) -> torch.Tensor:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed")
@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_reads_the_gguf_layout_as_transformers_computes(tiny, tmp_path, family):
    """The test's GGUF layout is llama.cpp's: llama.cpp's logits on it are transformers' (F32 file)."""
    hf_dir, ref = tiny(family)
    write_gguf(hf_dir, family, tmp_path / "m.gguf")
    ids = [3 + b for b in b"the same"]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    theirs = _llama_cpp_logits(tmp_path / "m.gguf", ids)
    assert float((want - theirs).abs().max()) < 0.005 * float(want.abs().max())


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed")
def test_compress_writes_a_moe_gguf_llama_cpp_runs(tmp_path):
    """`hetero compress synthetic:tiny-moe --format gguf`: merged Q8_0 expert tensors that hetero reads
    back as the same shape and llama.cpp runs with hetero's logits (Q8_0 activations on its side)."""
    from hetero.cli import main
    from hetero.model.sources import resolve_spec

    out = tmp_path / "tiny-moe.gguf"
    try:
        main(["compress", "synthetic:tiny-moe", "--format", "gguf", "--type", "Q8_0", "-o", str(out), "--no-progress"])
    except SystemExit as e:
        assert not e.code
    spec, want = resolve_spec(str(out)), resolve_spec("synthetic:tiny-moe")
    assert (spec.architecture, spec.n_experts, spec.experts_per_token, spec.expert_ffn, spec.norm_topk_prob) == \
           (want.architecture, want.n_experts, want.experts_per_token, want.expert_ffn, want.norm_topk_prob)
    exps = next(t for t in spec.tensors if t.name == "model.layers.0.mlp.experts.gate_proj.weight")
    assert exps.dtype == "Q8_0" and exps.shape == (8, 32, 64)
    net = hetero.load(str(out), dtype="fp32").net
    ids = [3 + b for b in b"the same text"]
    ours = net(torch.tensor([ids]), 0, net.new_cache(1, len(ids)), last_only=False)[0]
    theirs = _llama_cpp_logits(out, ids)
    assert float((ours - theirs).abs().max()) < 0.03 * float(ours.abs().max())
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    # `native` runs the file's own Q8_0 expert blocks (no float copy) with the same logits
    from hetero.ops.linear import NativeLinear

    nat = hetero.load(str(out), dtype="native").net
    assert isinstance(nat.layers[0].experts.gate_up0, NativeLinear)
    got = nat(torch.tensor([ids]), 0, nat.new_cache(1, len(ids)), last_only=False)[0]
    assert float((got - ours).abs().max()) < 0.03 * float(ours.abs().max())


def test_run_plans_and_restores_a_moe_from_the_tensor_cache(capsys):
    """`hetero run synthetic:tiny-moe` end to end (plan, tensor cache, engine); the second run builds
    its units from the cache entries the first wrote, with the same greedy tokens."""
    import json

    from tests.cli import run_cli

    args = ["run", "synthetic:tiny-moe", "--no-chat", "-p", "hello", "-n", "5", "--temperature", "0", "--json"]
    runs = []
    for _ in range(2):
        code, out, err = run_cli(args, capsys)
        assert code == 0, err
        runs.append(json.loads(out))
    assert runs[0]["generated_tokens"] == 5 and runs[0]["token_ids"] == runs[1]["token_ids"]


def test_info_shows_the_experts(capsys):
    import json

    from tests.cli import run_cli

    code, out, _ = run_cli(["info", "synthetic:qwen3-30b-a3b", "--json"], capsys)
    d = json.loads(out)
    assert (d["experts"], d["experts_per_token"], d["expert_ffn"]) == (128, 8, 768)
    layer = next(u for u in d["units"] if u["unit"] == "layers.0")
    experts = next(u for u in d["units"] if u["unit"] == "layers.0.experts")
    assert layer["expert_bf16_bytes"] == 0 and experts["expert_bf16_bytes"] == experts["bf16_bytes"]
    assert experts["bf16_bytes"] > 9 * layer["bf16_bytes"]   # the experts hold >90% of a layer's bytes
