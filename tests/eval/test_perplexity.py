"""The perplexity evaluator: window arithmetic, exact values on nets whose answer is known, CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch

from hetero.errors import HeteroError
from hetero.eval.corpus import builtin_text, calib_ids, eval_ids
from hetero.eval.perplexity import check_settings, perplexity, windows
from tests.cli import run_cli


class _Cache:
    def __init__(self, max_len):
        self.max_len = max_len


class BigramNet:
    """Logits that depend on the current token only: perplexity cannot depend on context/stride."""

    def __init__(self, vocab=50, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(vocab, vocab, generator=g)
        self.calls = 0

    def new_cache(self, batch, max_len):
        return _Cache(max_len)

    def __call__(self, ids, start, cache, last_only=True):
        assert ids.shape[1] <= cache.max_len
        self.calls += 1
        return self.table[ids]


@pytest.mark.parametrize("n,context,stride", [(10, 4, 4), (10, 4, 1), (11, 5, 3), (3, 8, 8), (100, 16, 7)])
def test_every_token_after_the_first_is_scored_exactly_once(n, context, stride):
    scored = []
    for b, e, first in windows(n, context, stride):
        assert e - b <= context and b < first <= e
        scored += range(first, e)
    assert scored == list(range(1, n))


def test_uniform_logits_give_the_vocabulary_size():
    class Uniform(BigramNet):
        def __call__(self, ids, start, cache, last_only=True):
            return torch.zeros(1, ids.shape[1], 37)

    r = perplexity(Uniform(), list(range(30)), context=8, stride=5, progress=False)
    assert r.perplexity == pytest.approx(37.0, rel=1e-5)
    assert r.tokens == 29


def test_bigram_perplexity_matches_direct_computation_and_ignores_stride():
    net = BigramNet()
    ids = torch.randint(0, 50, (120,), generator=torch.Generator().manual_seed(1))
    logp = torch.log_softmax(net.table[ids[:-1]], dim=-1)
    direct = math.exp(float(-logp.gather(1, ids[1:, None]).mean()))
    a = perplexity(net, ids, context=32, stride=32, progress=False)
    b = perplexity(net, ids, context=32, stride=8, progress=False)
    assert a.perplexity == pytest.approx(direct, rel=1e-5)
    assert b.perplexity == pytest.approx(direct, rel=1e-5)
    assert b.windows > a.windows


def test_kl_against_itself_is_zero_and_positive_against_another():
    ids = list(range(40))
    ref: list = []
    perplexity(BigramNet(seed=0), ids, 16, 16, progress=False, keep=ref)
    assert perplexity(BigramNet(seed=0), ids, 16, 16, progress=False, reference=ref).kl == pytest.approx(0, abs=1e-6)
    assert perplexity(BigramNet(seed=1), ids, 16, 16, progress=False, reference=ref).kl > 0.1


@pytest.mark.parametrize("n,context,stride", [(100, 1, 1), (100, 8, 9), (100, 8, 0), (1, 8, 8)])
def test_bad_settings_are_one_line_errors(n, context, stride):
    with pytest.raises(HeteroError):
        check_settings(n, context, stride)


def test_builtin_corpus_eval_and_calibration_are_disjoint():
    class Tok:
        def encode(self, text):
            return [ord(c) for c in text]

    text = builtin_text()
    assert len(text) > 100_000 and "assignment" in text
    ev = eval_ids(Tok(), tokens=5000)
    cal = calib_ids(Tok(), 5000)
    assert len(ev) == len(cal) == 5000
    assert ev == [ord(c) for c in text[:5000]]
    assert cal == [ord(c) for c in text[len(text) // 2:len(text) // 2 + 5000]]




def test_eval_cli_on_a_text_file(tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    code, out, _ = run_cli(["eval", "synthetic:tiny", "--text", str(f), "--context", "64", "--stride", "48", "--threads", "1",
                            "--json"], capsys)
    assert code == 0
    out = json.loads(out)
    assert out["tokens"] == len(f.read_text().encode()) - 1  # byte-level tokenizer of synthetic models
    assert out["context"] == 64 and out["stride"] == 48 and out["windows"] > 1
    assert 1.0 < out["perplexity"] < 2000
    assert out["compression"] is None


@pytest.mark.parametrize("args,msg", [(["--stride", "600"], "--stride"), (["--text", "/nonexistent.txt"], "not found"),
                                      (["--context", "9999"], "context")])
def test_eval_cli_bad_input_exits_2_with_one_line(args, msg, capsys):
    code, _, err = run_cli(["eval", "synthetic:tiny", "--tokens", "200", *args], capsys)
    assert code == 2
    assert err.startswith("error:") and msg in err and err.count("\n") == 1


def test_decode_path_scores_the_same_tokens_one_step_each():
    net = BigramNet()
    ids = torch.randint(0, 50, (60,), generator=torch.Generator().manual_seed(2))
    a = perplexity(net, ids, context=16, stride=8, progress=False)
    net.calls = 0
    b = perplexity(net, ids, context=16, stride=8, progress=False, decode=True)
    assert b.perplexity == pytest.approx(a.perplexity, rel=1e-6) and b.tokens == a.tokens
    # one call per scored token, plus one prefill of the history of every window after the first
    assert net.calls == b.tokens + b.windows - 1
