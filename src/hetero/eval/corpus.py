"""Evaluation and calibration text that needs no download.

The built-in corpus is the English documentation that ships with CPython (pydoc_data.topics: the
language reference topics behind `help()`), joined in sorted key order so every run sees the same
text. Evaluation reads from the start of the token stream and calibration from its second half, so
the two never overlap as long as evaluation uses fewer than half the tokens (~56k for SmolLM2).
"""
from __future__ import annotations

from pathlib import Path

from hetero.errors import HeteroError

BUILTIN_NAME = "pydoc"


def builtin_text() -> str:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it; user text still works
        raise HeteroError("the built-in corpus (pydoc_data.topics) is missing from this Python; "
                          "pass --text FILE") from None
    return "\n\n".join(topics[k] for k in sorted(topics))


def read_text(path: str | Path | None) -> str:
    """The text of FILE, or the built-in corpus when `path` is None."""
    if path is None:
        return builtin_text()
    p = Path(path).expanduser()
    if not p.is_file():
        raise HeteroError(f"text file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise HeteroError(f"{p}: not UTF-8 text") from None
    if not text.strip():
        raise HeteroError(f"{p}: the file is empty")
    return text


def eval_ids(tokenizer, text: str | None = None, tokens: int | None = None) -> list[int]:
    """Token ids to evaluate on: the first `tokens` ids of `text` (default: the built-in corpus)."""
    ids = tokenizer.encode(builtin_text() if text is None else text)
    return ids if not tokens else ids[:tokens]


def calib_ids(tokenizer, tokens: int, text: str | None = None) -> list[int]:
    """Calibration ids: `tokens` ids from the second half of the corpus (disjoint from eval_ids)."""
    ids = tokenizer.encode(builtin_text() if text is None else text)
    start = len(ids) // 2
    out = ids[start:start + tokens]
    if len(out) < tokens:
        raise HeteroError(f"calibration text has only {len(ids)} tokens; {2 * tokens} needed")
    return out
