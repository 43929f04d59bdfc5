from __future__ import annotations

import os
import time

import pytest
import torch

from hetero.hardware import bench, diskbench


def test_time_op_batches_until_min_time():
    calls = []
    secs = bench.time_op(lambda: calls.append(1), lambda: None, repeats=4, min_time=0.002)
    assert len(secs) == 4 and all(s > 0 for s in secs)
    assert len(calls) > 4  # batched: many calls per timed repeat


def test_probe_pools_samples_over_rounds():
    made = []

    def make():
        made.append(1)
        return lambda: sum(range(100))

    p = bench.Probe(("x",), "B/s", 1e6, make, lambda: None, 0.001)
    p.sample(3)
    p.sample(2)
    m = p.result()
    assert made == [1] and m.repeats == 5 and 0 < m.min <= m.median <= m.max
    p.release()
    assert p.fn is None


def test_probe_seconds_are_scaled_per_op():
    p = bench.Probe(("t",), "s", 0.0, lambda: (lambda: time.sleep(0.002)), lambda: None, 0.0, scale=0.5)
    p.sample(2)
    assert p.result().unit == "s" and 0.001 <= p.result().median < 0.05


def test_unsupported_probe_has_no_result():
    p = bench.Probe(("x",), "B/s", 1.0, lambda: None, lambda: None, 0.0)
    p.sample(3)
    assert p.result() is None and not p.supported


def test_device_probes_cover_every_figure(tiny):
    probes = bench.device_probes(bench.Backend("cpu"), tiny)
    keys = {p.key for p in probes}
    assert {("mem_bandwidth",), ("mem_read_bandwidth",), ("op_overhead",), ("gemm", "bf16"),
            ("gemv", "int4")} <= keys
    assert ("h2d_pinned",) not in keys  # only on CUDA
    gemv = {p.key[1]: p.work for p in probes if p.key[0] == "gemv"}
    assert gemv["fp32"] == 2 * gemv["bf16"]  # weight bytes streamed, by precision
    assert gemv["int8"] < gemv["bf16"] and gemv["int4"] < gemv["int8"]


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


def test_probe_file_written_once(tmp_path):
    p = diskbench.probe_file(1 << 20, tmp_path)
    assert p.stat().st_size == 1 << 20
    mtime = p.stat().st_mtime_ns
    assert diskbench.probe_file(1 << 20, tmp_path) == p and p.stat().st_mtime_ns == mtime
    assert diskbench.probe_file(2 << 20, tmp_path).stat().st_size == 2 << 20  # size changed: rewritten
    assert not list(tmp_path.glob("*.tmp"))


def test_direct_read_reads_the_whole_file(tmp_path, tiny):
    p = diskbench.probe_file(1 << 20, tmp_path)
    r = diskbench.DirectRead(p, 256 << 10)
    assert r.method in ("O_DIRECT", "fadvise DONTNEED")
    assert r() == 1 << 20
    assert diskbench.CachedRead(p, 256 << 10)() == 1 << 20


def test_direct_read_falls_back_without_o_direct(tmp_path, tiny, monkeypatch):
    p = diskbench.probe_file(1 << 20, tmp_path)
    real_open = os.open

    def no_direct(path, flags, *a):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")  # what tmpfs answers
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", no_direct)
    r = diskbench.DirectRead(p, 256 << 10)
    assert r.method == "fadvise DONTNEED" and r() == 1 << 20


def test_disk_probes_record_the_method(tiny):
    direct, cached = diskbench.disk_probes(tiny)
    direct.sample(2)
    cached.sample(2)
    assert direct.note in ("O_DIRECT", "fadvise DONTNEED")
    assert direct.result().median > 0 and cached.result().median > 0


def test_read_all_counts_bytes(tmp_path):
    import mmap
    p = tmp_path / "f"
    p.write_bytes(b"x" * 10000)
    fd = os.open(p, os.O_RDONLY)
    try:
        assert diskbench._read_all(fd, 10000, mmap.mmap(-1, 4096)) == 10000
    finally:
        os.close(fd)
