"""Incremental detokenisation: the streamed deltas join to the whole reply's decode, never end inside a
character, and each token decodes only a short window (not the reply so far)."""
from __future__ import annotations

import random

import pytest

from hetero.model.sources import resolve, resolve_spec
from hetero.model.tokenizer import Tokenizer, load_tokenizer
from hetero.runtime.generate import _Detok

TEXTS = ["héllo wörld — ñ 日本語 🙂 and more", "  two  spaces\n\nnew lines\tand tabs ", "emoji 🙂🙃🤖 in a row: ✓✗",
         "<|im_start|>user\nhi<|im_end|> plain text after"]


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    return load_tokenizer(resolve("smollm2-135m"), resolve_spec("smollm2-135m").vocab_size)


class Counting:
    """A tokenizer that records how many ids each decode call was given."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.sizes = tok, []

    def decode(self, ids):
        self.sizes.append(len(ids))
        return self.tok.decode(ids)


def deltas(tok, ids) -> list[str]:
    d = _Detok(tok)
    return [d.add(t) for t in ids]


def test_byte_tokens_split_inside_characters_stream_whole_characters():
    tok = Tokenizer(None, 259, set())  # one token a byte: every multi-byte character is split across tokens
    text = "aé日🙂b" * 3
    ids = tok.encode(text)
    out = deltas(tok, ids)
    assert "".join(out) == text
    assert all("\ufffd" not in o for o in out)
    # the 4-byte emoji comes out whole on its last byte, nothing before
    first = out[:len("aé日🙂".encode())]
    assert first == ["a", "", "é", "", "", "日", "", "", "", "🙂"]


def test_random_bytes_join_to_the_whole_decode():
    # random bytes hold invalid and truncated sequences: what is emitted is what a full decode says
    tok = Tokenizer(None, 259, set())
    rng = random.Random(0)
    for _ in range(50):
        ids = [3 + rng.choice([rng.randrange(128), rng.randrange(128, 256)]) for _ in range(rng.randrange(1, 40))]
        ids.append(3 + ord("x"))  # ends on a whole character, so everything must have been emitted
        assert "".join(deltas(tok, ids)) == tok.decode(ids)


def test_real_tokenizer_streams_the_same_text(smol):
    for text in TEXTS:
        ids = smol.encode(text)
        assert "".join(deltas(smol, ids)) == smol.decode(ids)
    rng = random.Random(1)
    for _ in range(20):  # arbitrary token sequences, byte-level pieces of characters included
        ids = [rng.randrange(smol.vocab_size) for _ in range(30)] + smol.encode(" end")
        assert "".join(deltas(smol, ids)) == smol.decode(ids)


def test_each_token_decodes_a_short_window(smol):
    ids = smol.encode(" ".join(TEXTS) * 8)
    assert len(ids) > 300
    counting = Counting(smol)
    assert "".join(deltas(counting, ids)) == smol.decode(ids)
    assert max(counting.sizes) <= 8  # a few tokens, however long the reply is
