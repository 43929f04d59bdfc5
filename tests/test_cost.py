"""The cost model's formulas on round numbers (hand-checked), and where its coefficients come from."""
from __future__ import annotations

import pytest

from hetero import cost
from hetero.cost import Coefficients, DeviceRates, Link
from hetero.hardware.types import (DeviceProfile, DeviceSpec, HardwareSpec, LinkSpec, Measurement,
                                   Profile)
from hetero.model.hf import spec_from_config

C = Coefficients()


def spec(tied=False, layers=2):
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=128,
               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
               max_position_embeddings=4096, rope_theta=1e4, rms_norm_eps=1e-5, tie_word_embeddings=tied)
    return spec_from_config(cfg, source="test", fmt="synthetic", name="toy")


def m(x, unit="B/s"):
    return Measurement(x, x, x, unit)


RATES = DeviceRates("cpu", "cpu", gemm={"bf16": 100e9}, gemv={"bf16": 10e9}, mem=20e9, overhead=2e-6)


@pytest.mark.parametrize("tied", [False, True])
def test_unit_bytes_table_matches_the_spec(tied):
    s = spec(tied)
    table = cost.unit_bytes_table(s, ["fp32", "bf16", "int8", "int4"])
    for u in s.unit_names():
        for p in ("fp32", "bf16", "int8", "int4"):
            assert table[(u, p)] == s.unit_bytes(u, p)


def test_decode_is_bandwidth_bound_by_hand():
    s = spec()
    # layer bf16 = 74240 B at 10 GB/s = 7.424 us; KV at context 100: 100 x 128 B = 12800 B at 20 GB/s
    # = 0.64 us; FLOPs 2 x 36864 + 4 x 64 x 100 = 99328 at 100 GFLOP/s = 0.99 us; 14 ops x 2 us = 28 us
    t = cost.compute_time(s, "layers.0", RATES, "bf16", 74240, 1, 100, 1, C)
    assert t == pytest.approx(7.424e-6 + 0.64e-6 + 28e-6)


def test_prefill_is_compute_bound_by_hand():
    s = spec()
    # 512 tokens x (2 x 36864 + 4 x 64 x 256) FLOPs = 512 x 139264 = 71.3 MFLOP at 100 GFLOP/s = 713 us
    t = cost.compute_time(s, "layers.0", RATES, "bf16", 74240, 512, 512, 1, C)
    assert t == pytest.approx(512 * 139264 / 100e9 + 28e-6)


def test_embedding_reads_rows_only():
    s = spec()
    # one row of a bf16 [256, 64] table: 128 B; a 512-token prompt reads the table once at most
    assert cost.read_bytes(s, "embed", 32768, 1) == 128
    assert cost.read_bytes(s, "embed", 32768, 512) == 32768
    assert cost.read_bytes(s, "layers.0", 74240, 1) == 74240


def test_transfer_and_overlap():
    s = spec()
    pcie = Link(((20e9, 10e-6),))
    # ram: 74240 B over 20 GB/s + 10 us
    assert cost.transfer_time(s, "layers.0", 74240, "ram", "cuda:0", 1, 1, 1e9, pcie, C) == pytest.approx(
        74240 / 20e9 + 10e-6)
    # disk to a GPU: the slower of the disk (74.24 us at 1 GB/s) and the link stage
    assert cost.transfer_time(s, "layers.0", 74240, "disk", "cuda:0", 1, 1, 1e9, pcie, C) == pytest.approx(74.24e-6)
    assert cost.transfer_time(s, "layers.0", 74240, "resident", "cpu", 1, 1, 1e9, pcie, C) == 0.0
    assert cost.overlapped(3.0, 5.0, True, 1.0) == 5.0
    assert cost.overlapped(3.0, 5.0, True, 0.5) == 6.5
    assert cost.overlapped(3.0, 5.0, False, 1.0) == 8.0


def test_memory_terms_by_hand():
    s = spec()
    assert cost.kv_bytes(s, "layers.1", "bf16", 32, 2) == 2 * 32 * 128
    assert cost.kv_bytes(s, "layers.1", "fp32", 32, 1) == 32 * 256
    assert cost.kv_bytes(s, "head", "bf16", 32, 1) == 0
    assert cost.workspace_bytes(s, 16, 1) == 4 * (16 * 576 + 4 * 16 * 16 + 256)
    # a CPU that may run int4 also holds prefill's dequantised block: 6 bytes per element of the
    # largest matrix here (vocab 256 x hidden 64; gate/up 2 x 128 x 64 is as large), capped at 2^20
    assert cost.workspace_bytes(s, 16, 1, dequant=True) == cost.workspace_bytes(s, 16, 1) + 6 * 256 * 64
    assert cost.buffer_bytes(s, "layers.0", 74240, 16, 1, C) == 2 * 74240
    assert cost.activation_bytes(s, 1, 3, C) == 3 * 64 * 4


def machine(profile=False, calibration=None):
    hw = HardwareSpec("h", (DeviceSpec("cpu", "cpu", 1 << 30, bandwidth=30e9, peak_flops={"bf16": 400e9}),
                            DeviceSpec("cuda:0", "cuda", 1 << 30, bandwidth=1e12, peak_flops={"bf16": 100e12}),
                            DeviceSpec("cuda:1", "cuda", 1 << 30, bandwidth=1e12, peak_flops={"bf16": 100e12}),
                            DeviceSpec("disk", "disk", 1 << 40, bandwidth=1e9)),
                      (LinkSpec("cpu", "cuda:0", 25e9, 10e-6), LinkSpec("cpu", "cuda:1", 25e9, 10e-6)))
    if not profile:
        return hw, None
    dp = DeviceProfile("cpu", gemm_flops={"bf16": m(386e9, "FLOP/s")},
                       gemv_bandwidth={"bf16": m(10e9), "int8": m(11e9)}, mem_bandwidth=m(27e9),
                       op_overhead=m(3e-6, "s"))
    return hw, Profile("h", 1, {}, {"cpu": dp}, disk_direct=m(730e6), calibration=calibration or {})


def test_rates_from_the_spec_sheet_times_efficiency():
    hw, _ = machine()
    r = cost.device_rates(hw, None)
    assert r["cpu"].gemv["bf16"] == pytest.approx(30e9 * C.gemv_eff["cpu"])
    assert r["cpu"].gemm["bf16"] == pytest.approx(400e9 * C.gemm_eff["cpu"])
    assert r["cpu"].gemm["int4"] == pytest.approx(400e9 * C.quant_gemm["int4"] * C.gemm_eff["cpu"])
    assert "fp16" not in r["cpu"].precisions and "fp16" in r["cuda:0"].precisions
    assert cost.disk_rate(hw, None) == pytest.approx(1e9 * C.disk_eff)


def test_measured_profile_wins_and_fills_gaps():
    hw, prof = machine(profile=True)
    r = cost.device_rates(hw, prof)["cpu"]
    assert r.gemv == {"bf16": 10e9, "int8": 11e9}  # the measured precisions define the kernels
    assert r.gemm["int8"] == pytest.approx(386e9 * C.quant_gemm["int8"])
    assert r.overhead == 3e-6 and r.mem == 27e9
    assert cost.disk_rate(hw, prof) == 730e6


def test_calibration_multipliers_scale_rates():
    cal = {"gemv_rate@cpu/int8": 0.5, "gemm_rate": 2.0, "disk_rate": 0.9, "op_overhead@cpu": 1.5}
    hw, prof = machine(profile=True, calibration=cal)
    r = cost.device_rates(hw, prof)["cpu"]
    assert r.gemv["int8"] == pytest.approx(5.5e9) and r.gemv["bf16"] == pytest.approx(10e9)
    assert r.gemm["bf16"] == pytest.approx(772e9)
    assert r.overhead == pytest.approx(4.5e-6)
    assert cost.disk_rate(hw, prof) == pytest.approx(657e6)
    assert cost.calibrated(cal, "gemv_rate", "cpu", "int8") == 0.5


def test_links_direct_and_through_the_host():
    hw, _ = machine()
    direct = cost.link(hw, None, "cpu", "cuda:0")
    assert direct.time(20e6) == pytest.approx(20e6 / (25e9 * C.link_eff) + 10e-6)
    via = cost.link(hw, None, "cuda:0", "cuda:1")  # no peer link: through host memory
    assert len(via.hops) == 2 and via.time(20e6) == pytest.approx(2 * direct.time(20e6))
    assert cost.link(hw, None, "cpu", "cpu").time(1e9) == 0.0


def test_prefill_rate_falls_with_matrix_size_by_hand():
    import dataclasses

    s = spec()
    # toy layer matrices (q+2kv=128) x 64, 64 x 64, 256 x 64, 128 x 64 elements: 8192, 4096, 16384, 8192
    mats = cost.unit_matrices(s, "layers.0")
    assert mats == [8192, 4096, 16384, 8192]
    assert cost.gemm_shape_factor(s, "layers.0", 8192.0, 0.0) == 1.0
    f = cost.gemm_shape_factor(s, "layers.0", 8192.0, 0.5)
    want = sum(mats) / sum(e * (e / 8192.0) ** 0.5 for e in mats)
    assert f == pytest.approx(want)
    # matrices all bigger than the probe's: slower than the probe; all smaller: faster
    assert cost.gemm_shape_factor(s, "layers.0", 1024.0, 0.25) < 1.0 < cost.gemm_shape_factor(s, "layers.0", 1e6, 0.25)
    # the term scales prefill only; decode (tokens = 1) is untouched
    shaped = dataclasses.replace(RATES, gemm_shape={"bf16": 0.5}, gemm_ref=8192.0)
    assert cost.compute_time(s, "layers.0", shaped, "bf16", 74240, 512, 512, 1, C) == pytest.approx(
        512 * 139264 / (100e9 * f) + 28e-6)
    assert cost.compute_time(s, "layers.0", shaped, "bf16", 74240, 1, 100, 1, C) == \
        cost.compute_time(s, "layers.0", RATES, "bf16", 74240, 1, 100, 1, C)


def test_calibration_fits_the_shape_term_only_across_models():
    from hetero.bench.calibrate import params_for

    def run(model):
        return {"config": {"model": model}, "plan": {"units": [{"precision": "bf16", "device": "cpu", "residency": "resident"}]}}
    assert not any(p.startswith("gemm_shape") for p in params_for([run("a"), run("a")]))
    assert "gemm_shape@cpu/bf16" in params_for([run("a"), run("b")])


def test_dequantising_prefill_pays_one_pass_per_chunk_by_hand():
    import dataclasses

    s = spec()
    # the probe: 512 tokens over 2048 x 2048 weights at 400 (bf16) and 320 GFLOP/s (int4)
    work, e = 2.0 * 512 * 2048 * 2048, 2048.0 * 2048.0
    deq = cost.dequant_rates({"bf16": 400e9, "int4": 320e9, "int8": 500e9}, 512, e)
    assert set(deq) == {"int4"}                                  # int8 is faster than bf16: no pass
    assert work / 400e9 + e / deq["int4"] == pytest.approx(work / 320e9)  # the probe's own time back
    r = dataclasses.replace(RATES, gemm={"int4": 100e9}, gemv={"int4": 10e9}, dequant={"int4": 1e9})
    plain = dataclasses.replace(r, dequant={})
    elems = sum(cost.unit_matrices(s, "layers.0"))                # 36864 weights: 36.9 us a pass
    for tokens, passes in ((64, 1), (512, 1), (513, 2), (1500, 3)):
        got = cost.compute_time(s, "layers.0", r, "int4", 20000, tokens, tokens, 1, C)
        base = cost.compute_time(s, "layers.0", plain, "int4", 20000, tokens, tokens, 1, C)
        assert got - base == pytest.approx(passes * elems / 1e9)
    # decode (one token) reads the packed weights directly: no pass
    assert cost.compute_time(s, "layers.0", r, "int4", 20000, 1, 100, 1, C) == \
        cost.compute_time(s, "layers.0", plain, "int4", 20000, 1, 100, 1, C)
