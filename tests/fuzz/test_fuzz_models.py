"""Seeded structural mutants of a tiny GGUF and a tiny HF dir, through `info` and (when the spec
passes) a two-token greedy run, in one worker under a 3 GB address-space cap: every one must be a
clean HeteroError or a run with the original's greedy tokens; none a bug, hang or other answer."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402


def test_mutated_model_files_are_refused_cleanly_or_answer_the_same(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    cases = harness.build_cases(tmp_path, n_gguf=160, n_hf=160, seed=7)
    for c in cases:
        c["as_limit"] = 3 << 30
    results, peak = harness.run_worker(cases, cache, timeout=240)
    assert [r["outcome"] for r in results[:harness.ORIGINALS]] == ["ok"] * harness.ORIGINALS, results[:3]
    counts = harness.classify(cases, results)
    bad = [(c["label"], r) for c, r in zip(cases, results) if r.get("bad")]
    assert not bad, bad[:5]
    assert counts["refused at info"] > 250 and sum(counts.values()) == 320, counts
    assert 0 < peak < 2 << 30
