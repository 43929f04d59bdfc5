"""Model sources and ModelSpec: built-in, synthetic, HF dirs (sharded too); no weights read to plan."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import hetero
from hetero.errors import HeteroError
from hetero.model.gguf import spec_from_gguf
from hetero.model.sources import builtin_path, resolve, resolve_spec
from tests.model.helpers import write_tiny_checkpoint


def test_builtin_spec_matches_smollm2_card():
    s = resolve_spec("smollm2-135m")
    assert (s.n_layers, s.hidden_size, s.intermediate_size, s.n_heads, s.n_kv_heads) == (30, 576, 1536, 9, 3)
    assert s.tie_embeddings and s.vocab_size == 49152 and s.rope_theta == 100000.0
    assert 134e6 < s.n_params < 136e6
    # Stored bytes come from the GGUF blocks (Q4_1 layers, Q8_0 embedding), not from a dtype guess.
    assert s.stored_bytes < s.total_bytes("bf16") / 2
    assert {t.dtype for t in s.tensors} >= {"Q4_1", "Q8_0", "F32"}


def test_cached_gguf_spec_equals_fresh_read():
    path = builtin_path("smollm2-135m")
    assert resolve_spec("smollm2-135m") == spec_from_gguf(path, name="smollm2-135m")
    assert resolve_spec("smollm2-135m") == resolve_spec("smollm2-135m")


@pytest.mark.parametrize("name,layers,params_b", [("llama-1b", 22, 1.1), ("llama-7b", 32, 6.74), ("llama-70b", 80, 70.55)])
def test_synthetic_specs_have_published_shapes(name, layers, params_b):
    s = resolve_spec(f"synthetic:{name}")
    assert s.n_layers == layers
    assert abs(s.n_params / 1e9 - params_b) < 0.01
    assert len(s.unit_names()) == layers + 2


def test_unknown_synthetic_lists_known():
    with pytest.raises(HeteroError, match="known: .*llama-1b"):
        resolve("synthetic:llama-999b")


def test_sharded_hf_dir_with_index(tmp_path):
    ref = write_tiny_checkpoint("llama", tmp_path / "one")
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    names = sorted(state)
    half = len(names) // 2
    out = tmp_path / "sharded"
    out.mkdir()
    (out / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(out / fname))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    a, b = hetero.load(str(tmp_path / "one")), hetero.load(str(out))
    assert a.spec.tensors and sorted(t.name for t in a.spec.tensors) == sorted(t.name for t in b.spec.tensors)
    ids = torch.tensor([[1, 2, 3, 4]])
    la = a.net(ids, 0, a.net.new_cache(1, 4))
    lb = b.net(ids, 0, b.net.new_cache(1, 4))
    torch.testing.assert_close(la, lb)


def test_synthetic_weights_written_once_and_reloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("HETERO_CACHE", str(tmp_path))
    m1 = hetero.load("synthetic:tiny")
    files = list(tmp_path.rglob("*.safetensors"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    m2 = hetero.load("synthetic:tiny")
    assert files[0].stat().st_mtime_ns == mtime
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(m1.net(ids, 0, m1.net.new_cache(1, 3)), m2.net(ids, 0, m2.net.new_cache(1, 3)))


def test_light_gguf_table_matches_the_gguf_reader_and_refuses_truncation(tmp_path):
    """hetero.model.gguf_index reads the tensor table without GGUFReader: same names, types, shapes and
    bytes as the reference reader; a cut-short file is a one-line error, not a bad read."""
    import numpy as np

    from hetero.model.gguf import open_reader
    from hetero.model.gguf_index import read_tensor, tensor_table

    path = builtin_path("smollm2-135m")
    table = tensor_table(path)
    ref = open_reader(path)
    assert set(table) == {t.name for t in ref.tensors}
    for t in ref.tensors:
        info = table[t.name]
        assert info.ggml_type == int(t.tensor_type)
        assert info.shape == tuple(int(x) for x in reversed(t.shape.tolist()))
        assert info.offset == int(t.data_offset) and info.nbytes == int(t.n_bytes)
    norm = read_tensor(path, table["output_norm.weight"])
    want = np.asarray(next(t for t in ref.tensors if t.name == "output_norm.weight").data, dtype=np.float32)
    assert np.array_equal(norm, want)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(HeteroError, match="truncated"):
        tensor_table(cut)
