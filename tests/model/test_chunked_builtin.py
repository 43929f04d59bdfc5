"""A chunked built-in model is assembled once into the cache from its packages, checked by sha256,
and refused with the install command when a package is missing or a chunk is corrupt."""
from __future__ import annotations

import hashlib
import sys

import pytest

from hetero.errors import HeteroError
from hetero.model import sources


@pytest.fixture
def fake_chunks(tmp_path, monkeypatch):
    """Three chunk packages under tmp_path (on sys.path) and a CHUNKED entry for them."""
    blobs = [bytes([i]) * (1000 + 7 * i) for i in range(3)]
    chunks = []
    for i, blob in enumerate(blobs):
        pkg = tmp_path / "pkgs" / f"hetero_test_chunk{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('never imported')\n")
        (pkg / "data" / f"m.gguf.part{i:02d}").write_bytes(blob)
        chunks.append((pkg.name, f"m.gguf.part{i:02d}"))
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    want = hashlib.sha256(b"".join(blobs)).hexdigest()
    entry = sources.Chunked(file="m.gguf", sha256=want, chunks=tuple(chunks), install="pip install test-chunks")
    monkeypatch.setitem(sources.CHUNKED, "test-model", entry)
    monkeypatch.setenv("HETERO_CACHE", str(tmp_path / "cache"))
    return tmp_path, blobs


def test_assembles_once_and_verifies(fake_chunks):
    tmp_path, blobs = fake_chunks
    path = sources.assembled_path("test-model")
    assert path.read_bytes() == b"".join(blobs)
    assert not any(m.startswith("hetero_test_chunk") for m in sys.modules)  # located, never imported
    mtime = path.stat().st_mtime_ns
    assert sources.assembled_path("test-model").stat().st_mtime_ns == mtime  # the stamp: not rewritten
    path.write_bytes(b"tampered")  # a changed file no longer matches its stamp: rebuilt from the chunks
    assert sources.assembled_path("test-model").read_bytes() == b"".join(blobs)


def test_corrupt_chunk_is_refused(fake_chunks):
    tmp_path, _ = fake_chunks
    (tmp_path / "pkgs" / "hetero_test_chunk1" / "data" / "m.gguf.part01").write_bytes(b"x" * 1007)
    with pytest.raises(HeteroError, match="sha256.*pip install test-chunks"):
        sources.assembled_path("test-model")
    assert not (tmp_path / "cache" / "models" / "m.gguf").exists()
    assert not list((tmp_path / "cache" / "models").glob("*.tmp"))


def test_missing_package_names_the_install(fake_chunks):
    tmp_path, _ = fake_chunks
    import shutil

    shutil.rmtree(tmp_path / "pkgs" / "hetero_test_chunk2")
    with pytest.raises(HeteroError, match="needs the package hetero-test-chunk2: pip install test-chunks"):
        sources.resolve("test-model")


def test_gemma_builtin_is_known():
    assert "gemma3-270m" in sources.CHUNKED
    with pytest.raises(HeteroError, match="gemma3-270m"):
        sources.resolve("no-such-model")
