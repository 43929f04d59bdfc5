"""The `tokenizers`-served tokenizer gives transformers' ids, and its chat template renders as
transformers renders it."""
from __future__ import annotations

import json
import warnings

import pytest

from hetero.errors import HeteroError
from hetero.model.chat_template import render
from hetero.model.sources import resolve, resolve_spec
from hetero.model.tokenizer import FastTokenizer, load_fast, load_tokenizer

TEXTS = ["hi", "What is the capital of France?", " leading and  double  spaces ", "héllo wörld — ñ 日本語 🙂",
         "<|im_start|>user\nliteral control tokens<|im_end|>", "a\n\nb\tc\r\n", "", "x = y + 3.14159; // 2024"]
CHATS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Two plus two?"},
     {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And <|im_end|> times two?"}],
    [{"role": "user", "content": "日本語で答えて", "name": None}],
]


@pytest.fixture(scope="module")
def pair():
    """Ours (as a run loads it) and transformers' tokenizer from the same saved files."""
    from transformers import AutoTokenizer

    from hetero.model.tokenizer import _gguf_cache_key
    from hetero.paths import cache_dir

    src = resolve("smollm2-135m")
    ours = load_tokenizer(src, resolve_spec("smollm2-135m").vocab_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = AutoTokenizer.from_pretrained(str(cache_dir() / "tokenizers" / _gguf_cache_key(src.path)))
    return ours, ref


def test_builtin_model_is_served_by_tokenizers(pair):
    ours, ref = pair
    assert isinstance(ours.hf, FastTokenizer)
    assert ours.hf.eos_token_id == ref.eos_token_id and ref.convert_tokens_to_ids("<|im_end|>") in ours.stop_ids


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_equal_transformers(pair, text):
    ours, ref = pair
    ids = ref.encode(text, add_special_tokens=True)
    assert ours.encode(text) == ids
    with_special = ids + [ref.convert_tokens_to_ids("<|im_end|>")]
    assert ours.decode(with_special) == ref.decode(with_special, skip_special_tokens=True)


@pytest.mark.parametrize("chat", CHATS, ids=range(len(CHATS)))
def test_chat_ids_equal_transformers(pair, chat):
    ours, ref = pair
    theirs = ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
    assert ours.chat(chat) == list(theirs)
    text = ref.apply_chat_template(chat, add_generation_prompt=False, tokenize=False)
    assert ours.hf.apply_chat_template(chat, add_generation_prompt=False, tokenize=False) == text


def test_template_features_transformers_provides():
    tpl = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
           "{% generation %}{{ m['content'] | tojson }}{% endgeneration %}{% if loop.last %}{% break %}{% endif %}"
           "{% endfor %}{{ ns.n }}{{ bos_token }}{% if add_generation_prompt %}>{% endif %}")
    out = render(tpl, [{"role": "user", "content": "<a & 'b'> ü"}], {"bos_token": "<s>"}, True)
    assert out == '"<a & \'b\'> ü"1<s>>'  # tojson neither escapes HTML nor non-ASCII, as transformers' does
    with pytest.raises(HeteroError, match="no system role"):
        render("{{ raise_exception('no system role') }}", [], {}, False)
    with pytest.raises(HeteroError):  # the sandbox: no reaching Python internals
        render("{{ messages.__class__.__mro__ }}", [], {}, False)
    with pytest.raises(HeteroError):
        render("{% set ns = namespace(_x=1) %}", [], {}, False)


def test_tokenizer_classes_with_behaviour_of_their_own_are_left_to_transformers(tmp_path, pair):
    ours, _ = pair
    ours.hf.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    assert load_fast(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "default", "template": "x"}]}))
    assert load_fast(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": {"content": "<|im_end|>"}, "chat_template": "{{ eos_token }}"}))
    fast = load_fast(tmp_path)
    assert fast is not None and fast.eos_token_id == ours.hf.eos_token_id
    assert fast.apply_chat_template([], tokenize=False) == "<|im_end|>"
