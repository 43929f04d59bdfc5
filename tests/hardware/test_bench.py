from __future__ import annotations

import os

import pytest
import torch

from hetero.hardware import bench, diskbench


def test_time_op_batches_until_min_time():
    calls = []
    secs = bench.time_op(lambda: calls.append(1), lambda: None, repeats=4, min_time=0.002)
    assert len(secs) == 4 and all(s > 0 for s in secs)
    assert len(calls) > 4  # batched: many calls per timed repeat


def test_rate_and_spread():
    m = bench.rate(10.0, [1.0, 2.0, 5.0], "B/s")
    assert (m.min, m.median, m.max, m.repeats) == (2.0, 5.0, 10.0, 3)
    c = bench.per_call([3.0, 1.0, 2.0])
    assert (c.min, c.median, c.max, c.unit) == (1.0, 2.0, 3.0, "s")


@pytest.mark.parametrize("prec", ["fp32", "bf16", "int8", "int4"])
def test_matmul_ops_compute_a_matmul_of_the_right_shape(prec):
    fn = bench.matmul_op(prec, 3, 128, 64, "cpu")
    assert fn is not None
    y = fn()
    assert tuple(y.shape) == (3, 64) and torch.isfinite(y.float()).all()


def test_int8_kernel_is_weight_only_matmul():
    # the int8 path must compute x @ (w * s)^T, else its timing measures the wrong thing
    torch.manual_seed(0)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    w = torch.randint(-128, 127, (32, 64), dtype=torch.int8)
    s = torch.rand(32, dtype=torch.bfloat16)
    ref = x.float() @ (w.float() * s.float()[:, None]).t()
    torch.testing.assert_close(torch._weight_int8pack_mm(x, w, s).float(), ref, rtol=2e-2, atol=2e-1)


def test_unknown_precision_has_no_op():
    assert bench.matmul_op("fp8", 2, 64, 64, "cpu") is None


def test_gemv_counts_weight_bytes(tiny):
    m = bench.gemv("int8", bench.Backend("cpu"), tiny)
    assert m.unit == "B/s" and m.median > 0


def test_probe_file_written_once(tmp_path):
    p = diskbench.probe_file(1 << 20, tmp_path)
    assert p.stat().st_size == 1 << 20
    mtime = p.stat().st_mtime_ns
    assert diskbench.probe_file(1 << 20, tmp_path) == p and p.stat().st_mtime_ns == mtime
    assert diskbench.probe_file(2 << 20, tmp_path).stat().st_size == 2 << 20  # size changed: rewritten
    assert not list(tmp_path.glob("*.tmp"))


def test_direct_read_reads_the_whole_file(tmp_path, tiny):
    p = diskbench.probe_file(1 << 20, tmp_path)
    m, method = diskbench.read_direct(p, tiny)
    assert method in ("O_DIRECT", "fadvise DONTNEED") and m.median > 0
    assert diskbench.read_cached(p, tiny).median > 0


def test_direct_read_falls_back_without_o_direct(tmp_path, tiny, monkeypatch):
    p = diskbench.probe_file(1 << 20, tmp_path)
    real_open = os.open

    def no_direct(path, flags, *a):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")  # what tmpfs answers
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", no_direct)
    m, method = diskbench.read_direct(p, tiny)
    assert method == "fadvise DONTNEED" and m.median > 0


def test_read_all_counts_bytes(tmp_path):
    import mmap
    p = tmp_path / "f"
    p.write_bytes(b"x" * 10000)
    fd = os.open(p, os.O_RDONLY)
    try:
        assert diskbench._read_all(fd, 10000, mmap.mmap(-1, 4096)) == 10000
    finally:
        os.close(fd)
