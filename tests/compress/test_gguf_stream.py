"""The streaming GGUF writer on synthetic models: `hetero compress synthetic:NAME --format gguf`."""
from __future__ import annotations

import importlib.util
import os
import weakref

import numpy as np
import pytest
import torch

from tests.cli import assert_clean_error, run_cli

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
TYPES = ("Q8_0", "Q4_0", "Q4_1")


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """synthetic:tiny written once per block type through the CLI."""
    from hetero.cli import main

    d = tmp_path_factory.mktemp("synth-gguf")
    files = {}
    for t in TYPES:
        out = d / f"tiny-{t}.gguf"
        try:
            main(["compress", "synthetic:tiny", "--format", "gguf", "--type", t, "-o", str(out), "--no-progress"])
        except SystemExit as e:
            assert not e.code
        files[t] = out
    return files


def test_synthetic_tensors_are_seeded_per_name_and_match_the_safetensors_dir():
    from safetensors import safe_open

    from hetero.model.hf import safetensors_files
    from hetero.model.synthetic import ensure_weights, tensor

    a = tensor("model.layers.0.mlp.up_proj.weight", (176, 64))
    assert torch.equal(a, tensor("model.layers.0.mlp.up_proj.weight", (176, 64)))
    assert not torch.equal(a, tensor("model.layers.1.mlp.up_proj.weight", (176, 64)))
    assert not torch.equal(a, tensor("model.layers.0.mlp.up_proj.weight", (176, 64), seed=1))
    assert a.dtype == torch.bfloat16 and 0.8 < float(a.float().std() * 64 ** 0.5) < 1.2
    (f,) = safetensors_files(ensure_weights("tiny", progress=False))
    with safe_open(str(f), framework="pt") as fh:
        for name in ("model.layers.1.self_attn.k_proj.weight", "lm_head.weight", "model.norm.weight"):
            t = fh.get_tensor(name)
            assert torch.equal(t, tensor(name, tuple(t.shape)))


@pytest.mark.parametrize("qtype", TYPES)
def test_streamed_file_has_the_types_shapes_and_values(tiny_files, qtype):
    import gguf

    from hetero.compress.gguf_export import _permute, gguf_name, quantize
    from hetero.model.gguf import _unpermute
    from hetero.model.gguf_index import tensor_table
    from hetero.model.sources import resolve, resolve_spec
    from hetero.model.spec import expected_tensors
    from hetero.model.synthetic import tensor
    from hetero.model.weights import WeightStore

    path = tiny_files[qtype]
    spec = resolve_spec(str(path))
    want = resolve_spec("synthetic:tiny")
    assert (spec.n_layers, spec.hidden_size, spec.intermediate_size, spec.n_heads, spec.n_kv_heads,
            spec.vocab_size) == (want.n_layers, want.hidden_size, want.intermediate_size, want.n_heads,
                                 want.n_kv_heads, want.vocab_size)
    table = tensor_table(path)
    store = WeightStore(resolve(str(path)), spec)
    qt = gguf.GGMLQuantizationType[qtype]
    for name, shape in expected_tensors(want):
        entry = table[gguf_name(name)]
        quantised = len(shape) == 2 and shape[1] % 32 == 0  # tiny's FFN width 176 is not: F32
        assert entry.ggml_type == int(qt if quantised else gguf.GGMLQuantizationType.F32), name
        assert entry.shape == tuple(shape), name
        got = store(name)
        assert tuple(got.shape) == tuple(shape)
        src = tensor(name, shape).float()
        if not quantised:
            assert torch.equal(got.float(), src), name
            continue
        heads = {"q_proj": want.n_heads, "k_proj": want.n_kv_heads}.get(name.split(".")[-2])
        x = src.numpy() if heads is None else _permute(src.numpy(), heads)
        deq = gguf.quants.dequantize(quantize(np.ascontiguousarray(x), qtype, search=False), qt).reshape(x.shape)
        expect = deq if heads is None else _unpermute(deq, heads)
        assert np.array_equal(got.float().numpy(), expect), name
        # and close to the synthetic values themselves (the block grid's error, no mix-up of rows)
        err = float((got.float() - src).abs().max() / src.abs().max())
        assert err < (0.02 if qtype == "Q8_0" else 0.2), (name, err)


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed")
def test_llama_cpp_runs_the_streamed_file_with_hetero_s_logits(tiny_files):
    import llama_cpp

    from hetero.compress.core import build_net
    from hetero.model.sources import resolve, resolve_spec
    from hetero.model.spec import expected_tensors
    from hetero.model.weights import WeightStore, required

    path = str(tiny_files["Q8_0"])
    llm = llama_cpp.Llama(model_path=path, n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    out = llm("hello world", max_tokens=6, temperature=0.0)
    assert out["usage"]["completion_tokens"] >= 1
    # the same file through hetero (fp32 over the dequantised blocks): the same next-token logits
    spec = resolve_spec(path)
    get = required(WeightStore(resolve(path), spec))
    net = build_net(spec, {n: get(n).float() for n, _ in expected_tensors(spec)})
    ids = [3 + b for b in b"the same text"]
    ours = net(torch.tensor([ids]), 0, net.new_cache(1, len(ids)), last_only=False)[0].float()
    llm.reset()
    llm.eval(ids)
    theirs = torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))
    assert float((ours - theirs).abs().max()) < 0.02 * float(ours.abs().max())
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_the_1b_shape_uses_the_built_in_vocabulary():
    from hetero.model.sources import builtin_path, resolve, resolve_spec
    from hetero.model.tokenizer import load_tokenizer
    from hetero.model.synthetic import tokenizer_gguf

    spec = resolve_spec("synthetic:tinyllama-1.1b")
    assert (spec.n_layers, spec.hidden_size, spec.intermediate_size, spec.n_heads, spec.n_kv_heads,
            spec.vocab_size, spec.tie_embeddings) == (22, 2048, 5632, 32, 4, 49152, False)
    assert resolve_spec("synthetic:llama2-7b-smol").vocab_size == 49152
    assert tokenizer_gguf("tinyllama-1.1b") == builtin_path("smollm2-135m")
    assert tokenizer_gguf("tiny") is None
    text = "The capital of France is Paris."
    synth = load_tokenizer(resolve("synthetic:tinyllama-1.1b"), spec.vocab_size)
    real = load_tokenizer(resolve("smollm2-135m"), 49152)
    assert synth.encode(text) == real.encode(text) and len(synth.encode(text)) < len(text) // 2
    assert synth.stop_ids == real.stop_ids


def test_cli_refuses_a_bad_type_and_an_existing_output(tmp_path, capsys):
    code, _, err = run_cli(["compress", "synthetic:tiny", "--format", "gguf", "--type", "Q5_K",
                            "-o", str(tmp_path / "x.gguf")], capsys)
    assert_clean_error(code, err, "Q5_K", "Q8_0")
    assert not (tmp_path / "x.gguf").exists()
    (tmp_path / "x.gguf").write_bytes(b"GGUF keep me")
    code, _, err = run_cli(["compress", "synthetic:tiny", "--format", "gguf", "-o", str(tmp_path / "x.gguf")], capsys)
    assert_clean_error(code, err, "already exists", "--force")
    assert (tmp_path / "x.gguf").read_bytes() == b"GGUF keep me"
    code, _, err = run_cli(["compress", "synthetic:nope", "--format", "gguf", "-o", str(tmp_path / "y.gguf")], capsys)
    assert_clean_error(code, err, "nope")
    assert list(tmp_path.iterdir()) == [tmp_path / "x.gguf"]  # no partial file left behind


def test_force_replaces_an_earlier_export(tmp_path, capsys):
    out = tmp_path / "x.gguf"
    code, _, _ = run_cli(["compress", "synthetic:tiny", "--format", "gguf", "--type", "Q4_0", "-o", str(out),
                          "--no-progress"], capsys)
    first = out.stat().st_size
    code, _, err = run_cli(["compress", "synthetic:tiny", "--format", "gguf", "--type", "Q8_0", "-o", str(out),
                            "--force", "--json", "--no-progress"], capsys)
    assert code == 0 and out.stat().st_size > first
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as any file written under the umask
    assert [p.name for p in tmp_path.iterdir()] == ["x.gguf"]


def test_the_writer_asks_for_one_tensor_at_a_time_and_keeps_none(tmp_path):
    from hetero.compress.gguf_export import byte_vocab_kv, write_stream
    from hetero.model.sources import resolve_spec
    from hetero.model.spec import expected_tensors
    from hetero.model.synthetic import tensor

    spec = resolve_spec("synthetic:tiny")
    asked, alive = [], []

    def get(name, shape):
        # every tensor handed out before must already be written and dropped
        assert not any(r() is not None for r in alive), f"a tensor is still held when {name} is asked for"
        asked.append(name)
        t = tensor(name, shape)
        alive.append(weakref.ref(t))
        return t

    total = write_stream(tmp_path / "x.gguf", spec, get, "Q4_0", byte_vocab_kv(spec.vocab_size))
    assert asked == [n for n, _ in expected_tensors(spec)]
    assert total < (tmp_path / "x.gguf").stat().st_size < total + 64 * 1024  # data + header and vocab
