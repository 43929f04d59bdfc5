"""Tokenizer and chat template: from GGUF metadata or an HF dir, or a byte-level fallback for
synthetic models, which have no trained vocabulary (those shaped on the built-in vocabulary use its).

A Gemma 3 GGUF's SentencePiece vocabulary is served by model/spm.py (llama.cpp's algorithm: the ids
transformers' conversion gives differ on runs of spaces). A tokenizer.json is served by the `tokenizers` package directly and its chat template rendered by
chat_template.py: importing transformers costs a run's start ~1-3 s. transformers is used only where
that cannot give the same ids: converting a GGUF file's vocabulary (once; the result is cached under
the cache dir, keyed by the file's size and mtime) and HF dirs whose tokenizer is a class of its own.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from hetero.errors import HeteroError
from hetero.model.sources import Source
from hetero.paths import cache_dir

# transformers' named special tokens: the chat template sees each one the config sets, by name
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# tokenizer classes that are tokenizer.json and nothing more (no class-specific pre-/post-processing)
PLAIN_CLASSES = (None, "PreTrainedTokenizerFast", "TokenizersBackend")


class FastTokenizer:
    """A tokenizer.json through `tokenizers`, with the part of transformers' tokenizer API that
    Tokenizer uses (encode, decode, apply_chat_template, chat_template, eos_token_id)."""

    def __init__(self, backend: Any, chat_template: str | None, special_tokens: dict[str, str]):
        self.backend, self.chat_template, self.special_tokens = backend, chat_template, special_tokens
        eos = special_tokens.get("eos_token")
        self.eos_token_id = None if eos is None else backend.token_to_id(eos)

    def __len__(self) -> int:
        # as len() of a transformers tokenizer: the vocabulary with its added tokens
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = True):
        from hetero.model.chat_template import render

        text = render(self.chat_template, messages, self.special_tokens, add_generation_prompt)
        # the template writes the special tokens itself, so none are added (as transformers does)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _token_text(v: Any) -> str | None:
    """A special token in tokenizer_config.json: a string or an AddedToken object."""
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return None


def load_fast(d: Path) -> FastTokenizer | None:
    """The tokenizer in dir `d` through `tokenizers`, or None when only transformers gives its exact
    ids: no tokenizer.json, a tokenizer class with behaviour of its own, or several named chat templates."""
    if not (d / "tokenizer.json").is_file():
        return None
    try:
        config = json.loads((d / "tokenizer_config.json").read_text()) if (d / "tokenizer_config.json").is_file() else {}
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("tokenizer_class") not in PLAIN_CLASSES \
            or config.get("model_specific_special_tokens"):
        return None
    template = config.get("chat_template")
    if (d / "chat_template.jinja").is_file():  # transformers: the file wins over the config entry
        template = (d / "chat_template.jinja").read_text(encoding="utf-8")
    if template is not None and not isinstance(template, str):
        return None  # named templates: transformers picks among them
    if any(p.name.startswith("chat_template_") for p in d.glob("chat_template_*")):
        return None
    from tokenizers import Tokenizer as Backend

    try:
        backend = Backend.from_file(str(d / "tokenizer.json"))
    except Exception:  # a tokenizer.json this tokenizers cannot read: transformers may
        return None
    special = {k: t for k in SPECIAL_TOKENS if (t := _token_text(config.get(k))) is not None}
    return FastTokenizer(backend, template or None, special)


class Tokenizer:
    """encode / decode / chat prompt; `stop_ids` are the ids that end generation."""

    def __init__(self, hf: Any | None, vocab_size: int, eos_ids: set[int]):
        self.hf = hf
        self.vocab_size = vocab_size
        self.stop_ids = eos_ids

    @property
    def has_chat_template(self) -> bool:
        return self.hf is not None and bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        if self.hf is None:
            return [3 + (b % (self.vocab_size - 3)) for b in text.encode("utf-8")]
        return list(self.hf.encode(text, add_special_tokens=True))

    def decode(self, ids: list[int]) -> str:
        if self.hf is None:
            return bytes((i - 3) % 256 for i in ids if i >= 3).decode("utf-8", errors="replace")
        return self.hf.decode(ids, skip_special_tokens=True)

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of `messages` rendered with the model's chat template, ready for the reply."""
        if not self.has_chat_template:
            text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
            return self.encode(text)
        try:
            out = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as e:  # a template that fails to compile or raises is the model's fault
            raise HeteroError(f"the model's chat template failed ({type(e).__name__}: {e}); try --no-chat") from None
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)


def _gguf_cache_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def gguf_tokenizer_cached(path: Path) -> bool:
    """Whether the GGUF file's tokenizer is already converted into the cache (no transformers needed)."""
    from hetero.model.spm import _cache_file

    return (cache_dir() / "tokenizers" / _gguf_cache_key(path) / "tokenizer_config.json").exists() \
        or _cache_file(path).exists()


# GGUF architectures whose SentencePiece vocabulary hetero tokenizes itself (model/spm.py)
SPM_ARCHITECTURES = ("gemma3",)
# end-of-turn tokens by family, where the generic list below would pick a wrong one (Gemma's "</s>"
# is plain text)
TURN_ENDS = {"gemma3": ("<end_of_turn>",)}


def _load_gguf_tokenizer(path: Path):
    cached = cache_dir() / "tokenizers" / _gguf_cache_key(path)
    if (cached / "tokenizer_config.json").exists():
        fast = load_fast(cached)
        if fast is not None:
            return fast
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(cached))
        except Exception:
            shutil.rmtree(cached, ignore_errors=True)  # stale or corrupt: rebuild below
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=cached.parent))
        tok.save_pretrained(str(tmp))
        os.replace(tmp, cached)
    except OSError:
        return tok  # an unwritable cache only costs speed
    # served from the cache from the first run on, so a cold run tokenizes as the warm ones do
    return load_fast(cached) or tok


def _token_id(hf: Any, token: str) -> int | None:
    if hasattr(hf, "token_id"):  # FastTokenizer, SpmTokenizer
        return hf.token_id(token)
    return hf.convert_tokens_to_ids(token) if token in hf.get_vocab() else None


def load_tokenizer(source: Source, vocab_size: int, eos_token_id: int | None = None) -> Tokenizer:
    try:
        return _load(source, vocab_size, eos_token_id)
    except HeteroError:
        raise
    except Exception as e:  # transformers raises anything on a corrupt vocabulary or template
        raise HeteroError(f"{source.path or source.name}: cannot build the tokenizer "
                          f"({type(e).__name__}: {str(e)[:200]})") from None


def _load(source: Source, vocab_size: int, eos_token_id: int | None) -> Tokenizer:
    hf = None
    arch = None
    if source.kind == "gguf":
        from hetero.model.sources import cached_gguf_spec

        arch = cached_gguf_spec(source).architecture
    if arch in SPM_ARCHITECTURES:
        from hetero.model.chat_template import BUILTIN_TEMPLATES
        from hetero.model.spm import load_spm

        hf = load_spm(source.path, BUILTIN_TEMPLATES.get(arch))
    elif source.kind == "gguf":
        hf = _load_gguf_tokenizer(source.path)
    elif source.kind == "synthetic":
        from hetero.model.synthetic import tokenizer_gguf

        path = tokenizer_gguf(source.name)
        hf = _load_gguf_tokenizer(path) if path is not None else None
    elif source.kind == "hf" and any((source.path / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        hf = load_fast(source.path)
        if hf is None:
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(str(source.path))
    eos: set[int] = set()
    if hf is not None:
        v = getattr(hf, "eos_token_id", None)
        if isinstance(v, int):
            eos.add(v)
        # Chat models end a turn with an end-of-turn token that may differ from eos.
        for tok in TURN_ENDS.get(arch, ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>")):
            tid = _token_id(hf, tok)
            if isinstance(tid, int):
                eos.add(tid)
        if len(hf) > vocab_size:
            raise HeteroError(f"{source.path}: the tokenizer has {len(hf)} tokens, the embedding {vocab_size} rows")
        bad = [i for i in eos if not 0 <= i < vocab_size]
        if bad:
            raise HeteroError(f"{source.path}: end-of-text id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
    elif eos_token_id is not None:
        eos.add(eos_token_id)
    return Tokenizer(hf, vocab_size, eos)
