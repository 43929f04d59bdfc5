"""A SentencePiece-BPE tokenizer read from a GGUF vocabulary (tokenizer.ggml.model = "llama"), the way
llama.cpp tokenizes it, so ids match llama.cpp's on the same file (Gemma 3's vocabulary).

transformers' GGUF conversion of Gemma's vocabulary splits runs of spaces differently from llama.cpp
(33 spaces: 16 + 17 instead of 31 + 2), so hetero reads the vocabulary itself:
  1. special tokens (control and user-defined: <start_of_turn>, runs of spaces or newlines) are cut
     out first, the longest match at the leftmost position;
  2. the rest, spaces written as U+2581, is merged pair by pair, the pair whose merge is the
     highest-scoring token first (ties: the leftmost), as SentencePiece's BPE does;
  3. a piece left outside the vocabulary falls back to its UTF-8 bytes (<0xXX> tokens).
The vocabulary (262k strings) is read from the file once and kept under the cache dir as JSON.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import os
import re
import tempfile
from functools import lru_cache
from pathlib import Path

from hetero.errors import HeteroError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"


class SpmTokenizer:
    """encode / decode with the API of tokenizer.FastTokenizer (what tokenizer.Tokenizer calls)."""

    def __init__(self, tokens: list[str], scores: list[float], types: list[int], bos: int | None, eos: int | None,
                 add_bos: bool, chat_template: str | None = None):
        self.tokens, self.scores, self.types = tokens, scores, types
        self.ids = {t: i for i, t in enumerate(tokens) if types[i] != BYTE}
        self.byte_ids = {int(t[3:5], 16): i for i, t in enumerate(tokens) if types[i] == BYTE}
        self.bos, self.eos_token_id, self.add_bos = bos, eos, add_bos
        self.chat_template = chat_template
        self.special_tokens = {k: tokens[v] for k, v in (("bos_token", bos), ("eos_token", eos)) if v is not None}
        # special tokens by first character, longest first (the match taken at a position)
        specials: dict[str, list[str]] = {}
        for i, t in enumerate(tokens):
            if types[i] in (CONTROL, USER_DEFINED) and t:
                specials.setdefault(t[0], []).append(t)
        self._specials = {c: sorted(v, key=len, reverse=True) for c, v in specials.items()}
        self._starts = re.compile("[" + "".join(re.escape(c) for c in self._specials) + "]") if specials else None
        self._piece = lru_cache(maxsize=1 << 16)(self._encode_piece)

    def __len__(self) -> int:
        return len(self.tokens)

    def token_id(self, token: str) -> int | None:
        return self.ids.get(token)

    # ---- encoding -------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        out = [self.bos] if add_special_tokens and self.add_bos and self.bos is not None else []
        for frag, special in self._partition(text):
            out += [self.ids[frag]] if special else self._piece(frag)
        return out

    def _partition(self, text: str):
        """(fragment, is_special) in order: special tokens cut out, leftmost and longest first."""
        pos = 0
        if self._starts is not None:
            for m in self._starts.finditer(text):
                i = m.start()
                if i < pos:
                    continue
                tok = next((t for t in self._specials[text[i]] if text.startswith(t, i)), None)
                if tok is None:
                    continue
                if i > pos:
                    yield text[pos:i], False
                yield tok, True
                pos = i + len(tok)
        if pos < len(text):
            yield text[pos:], False

    def _encode_piece(self, text: str) -> list[int]:
        # symbols: a doubly linked list of UTF-8 characters, merged in place
        sym = list(text.replace(" ", SPACE))
        n = len(sym)
        prev, nxt = list(range(-1, n - 1)), list(range(1, n + 1))
        heap: list[tuple[float, int, int, str]] = []

        def push(left: int) -> None:
            right = nxt[left]
            if left < 0 or right >= n:
                return
            tid = self.ids.get(sym[left] + sym[right])
            if tid is not None:
                heapq.heappush(heap, (-self.scores[tid], left, right, sym[left] + sym[right]))

        for i in range(n - 1):
            push(i)
        while heap:
            _, left, right, merged = heapq.heappop(heap)
            # stale: a side was merged away or changed since the pair was queued
            if not sym[left] or not sym[right] or nxt[left] != right or sym[left] + sym[right] != merged:
                continue
            sym[left], sym[right] = merged, ""
            nxt[left] = nxt[right]
            if nxt[left] < n:
                prev[nxt[left]] = left
            if prev[left] >= 0:
                push(prev[left])
            push(left)
        out: list[int] = []
        i = 0
        while i < n:
            tid = self.ids.get(sym[i])
            if tid is not None:
                out.append(tid)
            else:  # byte fallback (unknown when the vocabulary has no byte tokens)
                for b in sym[i].encode("utf-8"):
                    out.append(self.byte_ids.get(b, self.ids.get("<unk>", 0)))
            i = nxt[i]
        return out

    # ---- decoding -------------------------------------------------------------------------------
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        buf = bytearray()
        for i in ids:
            if not 0 <= i < len(self.tokens):
                continue
            kind = self.types[i]
            if kind == BYTE:
                buf.append(int(self.tokens[i][3:5], 16))
            elif not (skip_special_tokens and kind == CONTROL):
                buf += self.tokens[i].replace(SPACE, " ").encode("utf-8")
        return buf.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = True):
        from hetero.model.chat_template import render

        text = render(self.chat_template, messages, self.special_tokens, add_generation_prompt)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _cache_file(path: Path) -> Path:
    from hetero.paths import cache_dir

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|spm1".encode()).hexdigest()[:16]
    return cache_dir() / "tokenizers" / f"{key}.spm.json"


def _read_vocab(path: Path) -> dict:
    from hetero.model.gguf import _field, open_reader

    r = open_reader(path)
    f = r.fields.get("tokenizer.ggml.tokens")
    if f is None:
        raise HeteroError(f"{path}: no tokenizer.ggml.tokens in the file")
    tokens = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
    sc, ty = r.fields.get("tokenizer.ggml.scores"), r.fields.get("tokenizer.ggml.token_type")
    scores = [float(sc.parts[i][0]) for i in sc.data] if sc is not None else [0.0] * len(tokens)
    types = [int(ty.parts[i][0]) for i in ty.data] if ty is not None else [NORMAL] * len(tokens)
    if len(scores) != len(tokens) or len(types) != len(tokens):
        raise HeteroError(f"{path}: tokenizer scores/types do not match its {len(tokens)} tokens")
    tpl = _field(r, "tokenizer.chat_template")
    return {"tokens": tokens, "scores": scores, "types": types,
            "bos": _field(r, "tokenizer.ggml.bos_token_id"), "eos": _field(r, "tokenizer.ggml.eos_token_id"),
            "add_bos": bool(_field(r, "tokenizer.ggml.add_bos_token", True)),
            "chat_template": tpl if isinstance(tpl, str) else None}


def load_spm(path: Path, default_template: str | None = None) -> SpmTokenizer:
    """The GGUF file's SentencePiece vocabulary (from the cache after the first read)."""
    cached = _cache_file(path)
    try:
        v = json.loads(cached.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        v = _read_vocab(path)
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cached.parent, suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(v, fh, ensure_ascii=False)
            os.replace(tmp, cached)
        except OSError:
            pass  # an unwritable cache only costs speed
    return SpmTokenizer(v["tokens"], v["scores"], v["types"], v["bos"], v["eos"], v["add_bos"],
                        v["chat_template"] or default_template)
