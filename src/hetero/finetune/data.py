"""Training data: a .txt file (one stream of text, cut into sequences) or .jsonl (one example a line).

A .jsonl line is an object with "text", or "prompt" and "completion" (joined). An example longer than
--seq-len is truncated to it, and the run says how many were and the first such line; a .txt stream is
packed into whole sequences of --seq-len tokens (the tail shorter than half a sequence is dropped).
"""
from __future__ import annotations

import json
from pathlib import Path

from hetero.errors import HeteroError


def read_examples(path: str | Path) -> tuple[list[str], list[int]]:
    """The texts in FILE and the line each came from (1 for a .txt)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise HeteroError(f"training data not found: {p}")
    if p.suffix not in (".txt", ".jsonl"):
        raise HeteroError(f"{p}: training data must be .txt or .jsonl")
    try:
        body = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise HeteroError(f"{p}: not UTF-8 text") from None
    if not body.strip():
        raise HeteroError(f"{p}: the file is empty")
    if p.suffix == ".txt":
        return [body], [1]
    texts, lines = [], []
    for n, line in enumerate(body.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise HeteroError(f"{p}:{n}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise HeteroError(f"{p}:{n}: expected an object with \"text\" (or \"prompt\" and \"completion\")")
        if isinstance(obj.get("text"), str):
            text = obj["text"]
        elif isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
            text = obj["prompt"] + obj["completion"]
        else:
            raise HeteroError(f"{p}:{n}: expected an object with \"text\" (or \"prompt\" and \"completion\")")
        if text.strip():
            texts.append(text)
            lines.append(n)
    if not texts:
        raise HeteroError(f"{p}: no examples with text")
    return texts, lines


def sequences(tokenizer, path: str | Path, seq_len: int, max_context: int) -> tuple[list[list[int]], list[str]]:
    """Token sequences of at most seq_len (each at least 2 tokens), and notes to print."""
    if not 2 <= seq_len <= max_context:
        raise HeteroError(f"--seq-len must be between 2 and the model's context {max_context} (got {seq_len})")
    texts, lines = read_examples(path)
    notes: list[str] = []
    if Path(path).suffix == ".txt":
        ids = tokenizer.encode(texts[0])
        seqs = [ids[a:a + seq_len] for a in range(0, len(ids), seq_len)]
        seqs = [s for s in seqs if len(s) == seq_len or len(s) >= max(2, seq_len // 2)]
        if not seqs:
            raise HeteroError(f"{path}: {len(ids)} tokens, too few for one training sequence")
        return seqs, notes
    seqs, cut, first = [], 0, None
    for text, n in zip(texts, lines):
        ids = tokenizer.encode(text)
        if len(ids) > seq_len:
            cut, first = cut + 1, first or n
            ids = ids[:seq_len]
        if len(ids) >= 2:
            seqs.append(ids)
    if cut:
        notes.append(f"{cut} example(s) longer than --seq-len {seq_len} were truncated to it (first: line {first})")
    if not seqs:
        raise HeteroError(f"{path}: no example has the 2 tokens a training sequence needs")
    return seqs, notes


def batches(seqs: list[list[int]], batch: int, step: int, seed: int) -> list[list[int]]:
    """The `batch` sequences of micro-step `step`: a seeded permutation per epoch, so a resumed run
    sees what an uninterrupted one would."""
    import random

    n = len(seqs)
    out = []
    for k in range(step * batch, step * batch + batch):
        epoch, i = divmod(k, n)
        order = list(range(n))
        random.Random(seed * 1000003 + epoch).shuffle(order)
        out.append(seqs[order[i]])
    return out
