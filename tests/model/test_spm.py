"""hetero's SentencePiece-BPE tokenizer (model/spm.py) on a small hand-made vocabulary: merges by
score, special tokens cut out longest first, byte fallback; and Gemma's built-in chat template
renders as transformers renders it."""
from __future__ import annotations

from hetero.model.spm import BYTE, CONTROL, NORMAL, USER_DEFINED, SpmTokenizer

_VOCAB = [("<pad>", CONTROL, 0.0), ("<eos>", CONTROL, 0.0), ("<bos>", CONTROL, 0.0),
          ("<start_of_turn>", CONTROL, 0.0), ("\n", USER_DEFINED, 0.0), ("  ", USER_DEFINED, 0.0),
          ("   ", USER_DEFINED, 0.0),
          *((f"<0x{b:02X}>", BYTE, 0.0) for b in range(256)),
          ("a", NORMAL, -1.0), ("b", NORMAL, -1.0), ("c", NORMAL, -1.0), ("\u2581", NORMAL, -1.0),
          ("ab", NORMAL, -3.0), ("bc", NORMAL, -2.0), ("\u2581a", NORMAL, -2.5)]


def _tok() -> SpmTokenizer:
    tokens, types, scores = (list(x) for x in zip(*_VOCAB))
    return SpmTokenizer(tokens, scores, types, bos=2, eos=1, add_bos=True)


def ids(tok, *pieces):
    return [tok.token_id(p) for p in pieces]


def test_merges_follow_scores():
    tok = _tok()
    # "bc" (-2) is merged before "ab" (-3), and "abc" is no token: "a" stays alone
    assert tok.encode("abc", add_special_tokens=False) == ids(tok, "a", "bc")
    assert tok.encode("ab") == [2, *ids(tok, "ab")]
    assert tok.encode(" ab", add_special_tokens=False) == ids(tok, "\u2581a", "b")


def test_specials_longest_first_and_bytes():
    tok = _tok()
    got = tok.encode("a     b\n<start_of_turn>é", add_special_tokens=False)   # five spaces: "   " + "  "
    assert got == [*ids(tok, "a", "   ", "  ", "b", "\n", "<start_of_turn>"), *(3 + 4 + b for b in "é".encode())]
    assert tok.decode(got) == "a     b\n<start_of_turn>é"
    assert tok.decode(got, skip_special_tokens=True) == "a     b\né"


def test_gemma_template_renders_as_transformers():
    import transformers

    from hetero.model.chat_template import GEMMA3_TEMPLATE, render

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Paris?"}]
    ours = render(GEMMA3_TEMPLATE, msgs, {"bos_token": "<bos>"}, True)
    assert ours == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
                    "<start_of_turn>user\nParis?<end_of_turn>\n<start_of_turn>model\n")
    from transformers.utils.chat_template_utils import render_jinja_template

    theirs = render_jinja_template(conversations=[msgs], chat_template=GEMMA3_TEMPLATE, add_generation_prompt=True,
                                   bos_token="<bos>")[0][0]
    assert ours == theirs
