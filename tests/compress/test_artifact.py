"""`hetero compress` end to end on synthetic:tiny: the artifact reloads through the ordinary loader and
computes what the in-memory transform computes; bad input is one line; no partial output remains."""
from __future__ import annotations

import json

import pytest
import torch

import hetero
from hetero.compress.core import build_net, load_model
from hetero.compress.methods import Options, apply
from tests.cli import run_cli




@pytest.fixture(scope="module")
def tiny():
    return load_model("synthetic:tiny")


def _logits(net, ids):
    return net(ids, 0, net.new_cache(1, ids.shape[1]), last_only=False)


@pytest.mark.parametrize("method,args", [("int4", ["--group", "64"]), ("gptq", ["--group", "32", "--sym"]),
                                         ("wanda", ["--nm", "2:4"]), ("kmeans", ["--values", "16"])])
def test_compress_writes_an_artifact_that_loads_and_matches(method, args, tiny, tmp_path, capsys):
    out = tmp_path / "art"
    code, stdout, err = run_cli(["compress", "synthetic:tiny", "--method", method, *args, "-o", str(out),
                                 "--calib-tokens", "256", "--json", "--no-progress", "--eval-tokens", "0"], capsys)
    assert code == 0, err
    record = json.loads(stdout)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["compression"] == record and record["method"] == method
    # bytes: the weights file as written (dense here); logical_bytes: the format's own size
    assert record["bytes"] == (out / "model.safetensors").stat().st_size
    assert 0 < record["logical_bytes"] < record["baseline_fp32_bytes"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no temp dir left behind
    # The artifact loads through the ordinary HF-dir path and computes the in-memory transform.
    opts = Options(progress=False, calib_tokens=256, **_opts(args))
    tensors, _ = apply(method, tiny, opts)
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(0))
    m = hetero.load(str(out))
    torch.testing.assert_close(_logits(m.net, ids), _logits(build_net(tiny.spec, tensors), ids))
    assert not torch.allclose(_logits(m.net, ids), _logits(build_net(tiny.spec, tiny.tensors), ids))
    code, stdout, _ = run_cli(["eval", str(out), "--tokens", "300", "--context", "128", "--json", "--no-progress"], capsys)
    assert code == 0 and json.loads(stdout)["compression"]["method"] == method


def _opts(args):
    d = {}
    for flag, key, cast in (("--group", "group", int), ("--nm", "nm", str), ("--values", "values", int)):
        if flag in args:
            d[key] = cast(args[args.index(flag) + 1])
    if "--sym" in args:
        d["sym"] = True
    return d


def test_unknown_method_lists_the_known_ones(tmp_path, capsys):
    code, _, err = run_cli(["compress", "synthetic:tiny", "--method", "zip", "-o", str(tmp_path / "x")], capsys)
    assert code == 2 and err.count("\n") == 1
    for name in ("int8", "int4", "gptq", "wanda", "magnitude", "kmeans"):
        assert name in err
    assert not (tmp_path / "x").exists()


def test_existing_output_is_refused_without_force(tmp_path, capsys):
    out = tmp_path / "art"
    out.mkdir()
    code, _, err = run_cli(["compress", "synthetic:tiny", "--method", "int8", "-o", str(out)], capsys)
    assert code == 2 and "exists" in err


def test_an_interrupted_write_leaves_nothing(tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    code, _, _ = run_cli(["compress", "synthetic:tiny", "--method", "int8", "-o", str(tmp_path / "art")], capsys)
    assert code == 130
    assert list(tmp_path.iterdir()) == []
