"""Bad input: plans for another model or machine, plans that no longer fit, a full or unwritable cache."""
from __future__ import annotations

import dataclasses
import errno
import json
import os

import pytest

import hetero
from tests.runtime_engine.helpers import everything, uniform_plan
from hetero.errors import HeteroError
from hetero.runtime import engine as eng
from hetero.runtime import tensorcache as tc
from hetero.runtime.engine import Engine
from tests.cli import assert_clean_error, run_cli

TINY = "synthetic:tiny"






def test_plan_for_another_model_is_refused_naming_both(tmp_path, capsys):
    plan = uniform_plan(hetero.spec("synthetic:llama-1b"), "int8")
    path = tmp_path / "plan.json"
    plan.save(path)
    code, _, err = run_cli(["run", TINY, "--plan", str(path), "-n", "2"], capsys)
    assert_clean_error(code, err, "synthetic:llama-1b", "synthetic:tiny")


def test_plan_for_another_hosts_devices_is_refused(tmp_path, capsys):
    spec = hetero.spec(TINY)
    plan = uniform_plan(spec, "bf16", device="cuda:3", host="gpu-box")
    path = tmp_path / "plan.json"
    plan.save(path)
    code, _, err = run_cli(["run", TINY, "--plan", str(path), "-n", "2"], capsys)
    assert_clean_error(code, err, "cuda:3")


def test_units_that_do_not_match_are_refused():
    spec = hetero.spec(TINY)
    plan = uniform_plan(spec, "fp32")
    with pytest.raises(HeteroError, match="units"):
        Engine.load(dataclasses.replace(plan, units=plan.units[:-1]), TINY, progress=False)


def test_not_a_plan(tmp_path, capsys):
    path = tmp_path / "plan.json"
    path.write_text("{not json")
    code, _, err = run_cli(["run", TINY, "--plan", str(path), "-n", "2"], capsys)
    assert_clean_error(code, err, "JSON")


def test_plan_that_no_longer_fits_fails_clearly_or_replans(tmp_path, monkeypatch):
    spec = hetero.spec(TINY)
    plan = uniform_plan(spec, "bf16", memory={"cpu": 10**15}, budgets={"cpu": 2 * 10**15})
    path = tmp_path / "plan.json"
    plan.save(path)
    assert "free now" in eng.check_fits(plan)
    assert eng.check_fits(dataclasses.replace(plan, memory={"cpu": 1000})) is None
    with pytest.raises(HeteroError, match="no longer fits"):
        eng.plan_for_run(TINY, str(path), replan=False)
    # re-planning with this machine's devices and a spec-sheet profile (no micro-benchmarks here)
    from hetero.hardware.inventory import inventory

    hw = tmp_path / "hw.json"
    hw.write_text(json.dumps(inventory().to_dict()))
    fresh, notes = eng.plan_for_run(TINY, str(path), hardware=str(hw), replan=True)
    assert any("re-planned" in n for n in notes)
    assert eng.check_fits(fresh) is None
    assert fresh.budgets["cpu"] < plan.budgets["cpu"]


def test_unwritable_cache_dir_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HETERO_CACHE", str(tmp_path / "c"))
    blocker = tmp_path / "c" / "tensors"
    blocker.parent.mkdir()
    blocker.write_text("a file where the tensor cache dir should be")
    spec = hetero.spec(TINY)
    with pytest.raises(HeteroError, match="cannot write the tensor cache"):
        Engine.load(uniform_plan(spec, "int8", everything(spec)), TINY, progress=False)


def test_full_disk_mid_write_leaves_no_half_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("HETERO_CACHE", str(tmp_path / "c"))
    spec = hetero.spec(TINY)
    real = tc.write_entry
    calls = {"n": 0}

    def flaky_fsync(fd):
        if not os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
            return real_fsync(fd)
        calls["n"] += 1
        if calls["n"] == 2:  # the second entry: its temp file is half written when the disk fills
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    real_fsync = os.fsync
    monkeypatch.setattr(tc.os, "fsync", flaky_fsync)
    with pytest.raises(HeteroError, match="disk full"):
        Engine.load(uniform_plan(spec, "int8", everything(spec)), TINY, progress=False)
    root = tmp_path / "c" / "tensors"
    files = [p for p in root.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.endswith(".tmp")]
    assert len(files) == 1  # only the entry written before the disk filled, complete
    monkeypatch.setattr(tc.os, "fsync", real_fsync)
    assert real is tc.write_entry
    with Engine.load(uniform_plan(spec, "int8", everything(spec)), TINY, progress=False) as e:
        assert len(e.generate("hi", max_new_tokens=3, chat=False)) == 3


def test_too_little_free_space_fails_before_writing(tmp_path, monkeypatch):
    monkeypatch.setenv("HETERO_CACHE", str(tmp_path / "c"))
    import shutil

    monkeypatch.setattr(tc.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    spec = hetero.spec(TINY)
    with pytest.raises(HeteroError, match="disk full.*needs"):
        Engine.load(uniform_plan(spec, "fp32", everything(spec)), TINY, progress=False)
    assert not [p for p in (tmp_path / "c").rglob("*.bin")]


def test_stale_or_damaged_entries_are_never_used(tmp_path, monkeypatch):
    monkeypatch.setenv("HETERO_CACHE", str(tmp_path / "c"))
    spec = hetero.spec(TINY)
    with Engine.load(uniform_plan(spec, "int8", everything(spec)), TINY, progress=False) as e:
        ref = e.generate("hi", max_new_tokens=4, chat=False)
    key = tc.entry_key(spec, "layers.0", "int8", "cpu")
    path = tc.entry_path(tc.cache_root(), key)
    assert tc.read_entry(path, key) is not None
    assert tc.read_entry(path, {**key, "precision": "int4"}) is None       # another plan's precision
    assert tc.read_entry(path, {**key, "fingerprint": "0" * 16}) is None   # another model
    assert tc.entry_path(tc.cache_root(), {**key, "torch": "0.0"}) != path  # another torch: another file
    assert tc.entry_path(tc.cache_root(), {**key, "code": "0" * 16}) != path  # other unit-building code
    with open(path, "r+b") as f:  # truncated: the data region is incomplete
        f.truncate(os.path.getsize(path) - 4096)
    assert tc.read_entry(path, key) is None
    with Engine.load(uniform_plan(spec, "int8", everything(spec)), TINY, progress=False) as e:
        assert e.generate("hi", max_new_tokens=4, chat=False) == ref
    assert tc.read_entry(path, key) is not None  # rebuilt


def test_dead_writers_temp_files_are_cleaned(tmp_path):
    d = tmp_path / "tensors" / "abc"
    d.mkdir(parents=True)
    stale = d / ".layers.0.int8.cpu.x.bin.999999999.tmp"
    stale.write_bytes(b"half")
    tc.clean_temps(tmp_path / "tensors")
    assert not stale.exists()


def test_entries_of_other_code_versions_are_pruned(tmp_path):
    """A new entry removes the same unit's stale siblings (other code or torch versions), not others."""
    d = tmp_path / "fp"
    d.mkdir()
    old = d / "layers.1.int8.cpu.aaaaaaaaaaaaaaaa.bin"
    fresh = d / "layers.1.int8.cpu.cccccccccccccccc.bin"
    other_unit = d / "layers.10.int8.cpu.bbbbbbbbbbbbbbbb.bin"
    other_prec = d / "layers.1.int4.cpu.dddddddddddddddd.bin"
    new = d / "layers.1.int8.cpu.eeeeeeeeeeeeeeee.bin"
    for f in (old, fresh, other_unit, other_prec, new):
        f.write_bytes(b"x")
    for f in (old, other_unit, other_prec):
        os.utime(f, (1, 1))  # long untouched
    gone = tc.prune_siblings(new)
    assert gone == [old]
    assert not old.exists() and fresh.exists() and other_unit.exists() and other_prec.exists() and new.exists()
