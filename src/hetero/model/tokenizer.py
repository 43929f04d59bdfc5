"""Tokenizer and chat template: from GGUF metadata or an HF dir (transformers' tokenizer classes),
or a byte-level fallback for synthetic models, which have no trained vocabulary.

Building a tokenizer from GGUF metadata takes seconds, so the converted tokenizer is cached under
the cache dir, keyed by the file's size and mtime.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from hetero.errors import HeteroError
from hetero.model.sources import Source
from hetero.paths import cache_dir


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


def _load_gguf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    cached = cache_dir() / "tokenizers" / _gguf_cache_key(path)
    if (cached / "tokenizer_config.json").exists():
        try:
            return AutoTokenizer.from_pretrained(str(cached))
        except Exception:
            shutil.rmtree(cached, ignore_errors=True)  # stale or corrupt: rebuild below
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=cached.parent))
        tok.save_pretrained(str(tmp))
        os.replace(tmp, cached)
    except OSError:
        pass  # an unwritable cache only costs speed
    return tok


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
    if source.kind == "gguf":
        hf = _load_gguf_tokenizer(source.path)
    elif source.kind == "hf" and any((source.path / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(source.path))
    eos: set[int] = set()
    if hf is not None:
        for name in ("eos_token_id",):
            v = getattr(hf, name, None)
            if isinstance(v, int):
                eos.add(v)
        # Chat models end a turn with an end-of-turn token that may differ from eos.
        for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>"):
            tid = hf.convert_tokens_to_ids(tok) if tok in hf.get_vocab() else None
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
