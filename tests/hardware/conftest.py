"""Fixtures for hardware tests: a fresh cache dir per test and tiny benchmark sizes."""
from __future__ import annotations

import pytest

from hetero.hardware.bench import Sizes

# Small enough that a whole profile takes well under a second; speeds are never asserted.
TINY = Sizes(gemm_m=16, gemm_k=128, gemm_n=128, gemv_bytes=256 << 10, copy_bytes=1 << 20,
             disk_bytes=1 << 20, disk_chunk=256 << 10, repeats=2, rounds=2, min_time=0.001, overhead_iters=20,
             rows_m=4, rows_k=256, rows_n=64)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HETERO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def tiny() -> Sizes:
    return TINY
