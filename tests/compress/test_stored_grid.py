"""Artifacts hold the quantiser's grid exactly: the GGUF's blocks dequantise to the method's
fake-quantised weights bit for bit, `hetero eval` on the file measures what compress measured, and
llama.cpp runs the same file to the same greedy tokens."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import hetero
from hetero.compress.core import build_net, linear_names, load_model
from hetero.compress.gguf_export import stored_values, write_gguf
from hetero.compress.methods import Options, apply
from tests.cli import run_cli

MODEL = "synthetic:tiny32"  # every matmul's K a multiple of 32


@pytest.fixture(scope="module")
def tiny():
    return load_model(MODEL)


@pytest.mark.parametrize("method,sym,group,qtype", [("rtn", False, 32, "Q4_1"), ("rtn", True, 32, "Q4_0"),
                                                    ("gptq", False, 64, "Q4_1"), ("awq", False, 32, "Q4_1")])
def test_the_gguf_holds_the_methods_grid_bit_for_bit(tiny, tmp_path, method, sym, group, qtype):
    import gguf

    tensors, record = apply(method, tiny, Options(group=group, sym=sym, calib_tokens=256, progress=False))
    grids = record.pop("_grids")
    assert sorted(grids) == sorted(linear_names(tiny.spec))
    out = tmp_path / "m.gguf"
    rec = write_gguf(out, tiny, tiny.spec, tensors, "Q8_0", record, grids=grids)
    assert rec["bytes"] == out.stat().st_size and rec["grid_exact"]
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.0.attn_q.weight"] == qtype and types["output.weight"] == qtype
    back = load_model(str(out))  # the file's blocks, dequantised by the reader
    for n in grids:
        assert torch.equal(back.tensors[n], tensors[n]), n
        assert not torch.equal(tensors[n], tiny.tensors[n])
    for n in ("model.layers.0.input_layernorm.weight", "model.norm.weight"):  # AWQ folds its scales here
        assert torch.equal(back.tensors[n], tensors[n])


def test_hetero_eval_of_the_gguf_gives_the_perplexity_of_what_compress_measured(tiny, tmp_path, capsys):
    out = tmp_path / "g.gguf"
    code, stdout, err = run_cli(["compress", MODEL, "--method", "gptq", "--group", "32", "--format", "gguf",
                                 "-o", str(out), "--calib-tokens", "256", "--eval-tokens", "0", "--json",
                                 "--no-progress"], capsys)
    assert code == 0, err
    record = json.loads(stdout)
    assert record["format"] == "gguf-Q4_1+Q8_0" and record["bytes"] == out.stat().st_size  # the untied embedding at --type
    code, stdout, err = run_cli(["eval", str(out), "--tokens", "600", "--json", "--no-progress"], capsys)
    assert code == 0, err
    r = json.loads(stdout)
    assert r["dtype"] == "native"  # a quantised GGUF runs as stored
    # The same ids (the file's own tokenizer) through the method's tensors held in fp32.
    from hetero.eval.corpus import eval_ids
    from hetero.eval.perplexity import perplexity

    tensors, rec = apply("gptq", tiny, Options(group=32, calib_tokens=256, progress=False))
    tensors = stored_values(tiny.spec, tensors, "Q8_0", rec.pop("_grids"))
    ids = eval_ids(hetero.load(str(out), dtype="native").tokenizer, None, 600)
    want = perplexity(build_net(tiny.spec, tensors), ids, 512, 256, progress=False).perplexity
    assert r["perplexity"] == pytest.approx(want, rel=1e-3)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_llama_cpp_runs_the_gguf_to_the_same_greedy_tokens(tiny, tmp_path):
    import llama_cpp

    tensors, record = apply("rtn", tiny, Options(group=32, progress=False))
    out = tmp_path / "r.gguf"
    write_gguf(out, tiny, tiny.spec, tensors, "Q8_0", record, grids=record.pop("_grids"))
    prompt = [5, 77, 301, 12, 250, 99, 400, 31]
    ours = _greedy(hetero.load(str(out), dtype="native").net, prompt, 8)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_threads=1, verbose=False)
    theirs = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1):
        theirs.append(tok)
        if len(theirs) == 8:
            break
    assert ours == theirs


def _greedy(net, prompt: list[int], n: int) -> list[int]:
    cache = net.new_cache(1, len(prompt) + n)
    logits = net(torch.tensor([prompt]), 0, cache)
    out, pos = [], len(prompt)
    for _ in range(n):
        tok = int(logits.reshape(-1, logits.shape[-1])[-1].argmax())
        out.append(tok)
        logits = net(torch.tensor([[tok]]), pos, cache)
        pos += 1
    return out
