"""`hetero run` / `hetero info`: output contract and bad input (one line, exit code 2, no traceback)."""
from __future__ import annotations

import json

from hetero.model.sources import builtin_path
from tests.cli import assert_clean_error, run_cli






def test_missing_file(capsys):
    code, _, err = run_cli(["run", "/no/such/model.gguf"], capsys)
    assert_clean_error(code, err, "not found")


def test_neither_gguf_nor_safetensors(tmp_path, capsys):
    p = tmp_path / "notes.bin"
    p.write_bytes(b"hello world, not a model" * 10)
    code, _, err = run_cli(["run", str(p)], capsys)
    assert_clean_error(code, err, "neither a GGUF nor a safetensors")


def test_truncated_gguf(tmp_path, capsys):
    p = tmp_path / "cut.gguf"
    p.write_bytes(builtin_path("smollm2-135m").read_bytes()[:3_000_000])
    code, _, err = run_cli(["info", str(p)], capsys)
    if code == 0:  # the header may survive the cut; loading weights must then fail cleanly
        code, _, err = run_cli(["run", str(p), "-n", "1"], capsys)
    assert_clean_error(code, err, "truncated or corrupt")


def test_unsupported_architecture_is_named(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    code, _, err = run_cli(["info", str(tmp_path)], capsys)
    assert_clean_error(code, err, "unsupported architecture", "gpt2")


def test_unsupported_gguf_architecture_is_named(tmp_path, capsys):
    import gguf
    import numpy as np

    p = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(str(p), "falcon")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    code, _, err = run_cli(["info", str(p)], capsys)
    assert_clean_error(code, err, "unsupported architecture", "falcon")


def test_prompt_longer_than_context(capsys):
    code, _, err = run_cli(["run", "synthetic:tiny", "--no-chat", "-p", "x" * 600], capsys)
    assert_clean_error(code, err, "600 tokens", "context is 512")


def test_run_json_contract_on_synthetic(capsys):
    code, out, _ = run_cli(["run", "synthetic:tiny", "--no-chat", "-p", "hello", "-n", "5", "--json"], capsys)
    assert code in (0, None)
    d = json.loads(out)
    for k in ("text", "token_ids", "prompt_tokens", "generated_tokens", "prefill_tok_s", "decode_tok_s", "peak_rss_bytes"):
        assert k in d
    assert d["prompt_tokens"] == 5 and d["generated_tokens"] == len(d["token_ids"]) >= 1


def test_info_reads_no_weights_for_a_70b(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HETERO_CACHE", str(tmp_path))
    code, out, _ = run_cli(["info", "synthetic:llama-70b", "--json"], capsys)
    d = json.loads(out)
    assert d["layers"] == 80 and d["params"] > 70e9
    assert not any(tmp_path.rglob("*.safetensors"))  # planning a 70B writes nothing
