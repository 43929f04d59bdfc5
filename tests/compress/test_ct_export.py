"""The compressed-tensors pack-quantized dir: its packing is the package's own, transformers (with
compressed-tensors) loads it to hetero's logits, and hetero reads the grid back exactly."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import hetero
from hetero.compress.core import load_model
from hetero.compress.grid import quantize
from hetero.model.ct import pack4, unpack4
from tests.cli import assert_clean_error, run_cli

needs_ct = pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None,
                              reason="compressed-tensors is not installed")


def _ct_helpers():
    """compressed-tensors' packing module alone (it needs only torch), without the package's heavy
    import of everything else."""
    import importlib.util as iu
    from pathlib import Path

    root = Path(iu.find_spec("compressed_tensors").origin).parent
    spec = iu.spec_from_file_location("_ct_pack_helpers", root / "compressors" / "pack_quantized" / "helpers.py")
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@needs_ct
def test_pack4_is_compressed_tensors_packing():
    h = _ct_helpers()
    pack_to_int32, unpack_from_int32 = h.pack_to_int32, h.unpack_from_int32

    u = torch.randint(0, 16, (24, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ref = pack_to_int32((u.to(torch.int16) - 8).to(torch.int8), 4)
    assert torch.equal(pack4(u), ref)
    assert torch.equal(unpack4(ref, 64), u)
    zp = pack_to_int32((u.to(torch.int16) - 8).to(torch.int8), 4, packed_dim=0)  # zero points pack along N
    assert torch.equal(pack4(u.T.contiguous()).T, zp)
    assert torch.equal(unpack_from_int32(pack4(u), 4, u.shape), (u.to(torch.int16) - 8).to(torch.int8))


def test_a_zero_point_grid_reads_back_exactly(tmp_path):
    from hetero.compress.ct_export import pack
    from hetero.model.ct import dequantize

    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2)) + 0.3
    g = quantize(w, 32, zp=True)
    assert g.zp and ((g.dequantize() - w).abs() <= g._expand(g.scale) * 0.5 + 1e-6).all()
    parts = pack(g)
    assert torch.equal(dequantize(lambda n: parts.get(n), ""), g.dequantize())


@needs_ct
def test_transformers_loads_the_dir_to_hetero_logits_and_hetero_runs_the_grid(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ct"
    code, stdout, err = run_cli(["compress", "synthetic:tiny32", "--method", "gptq", "--group", "32", "--sym",
                                 "--format", "ct", "-o", str(out), "--calib-tokens", "256", "--eval-tokens", "600",
                                 "--json", "--no-progress"], capsys)
    assert code == 0, err
    record = json.loads(stdout)
    assert record["bytes"] == (out / "model.safetensors").stat().st_size
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    code, stdout, err = run_cli(["eval", str(out), "--tokens", "600", "--json", "--no-progress"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["perplexity"] == pytest.approx(record["perplexity"]["value"], rel=1e-6)
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    tf = AutoModelForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32)
    with torch.no_grad():
        theirs = tf(ids).logits[0]
    m = hetero.load(str(out))
    ours = m.net(ids, 0, m.net.new_cache(1, 24), last_only=False).reshape(theirs.shape)
    assert (ours - theirs).abs().max() < 1e-2
    # the weights transformers decompressed are the grid hetero reads, bit for bit
    back = load_model(str(out)).tensors["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(tf.model.layers[1].mlp.down_proj.weight.float(), back)


def test_ct_asks_for_the_symmetric_grid(tmp_path, capsys):
    code, _, err = run_cli(["compress", "synthetic:tiny32", "--method", "rtn", "--format", "ct",
                            "-o", str(tmp_path / "x"), "--no-progress"], capsys)
    assert_clean_error(code, err, "--sym")
