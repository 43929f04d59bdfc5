"""The compiled kernels say whether they serve this process and why not; a failed build leaves a log."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hetero import cli
from hetero.ops import kernels

avx512 = pytest.mark.skipif(not kernels.cpu_supported(), reason="this CPU has no AVX-512: no build is tried")
STATUS = "import json; from hetero.ops import kernels; print(json.dumps(kernels.status()))"


def child(code_or_module: list[str], tmp_path: Path, **env) -> subprocess.CompletedProcess:
    """A fresh interpreter (kernels load once per process) with its own cache dir."""
    e = {**os.environ, "HETERO_CACHE": str(tmp_path / "cache"), **env}
    return subprocess.run([sys.executable, *code_or_module], env=e, capture_output=True, text=True, timeout=300)


def builds() -> set[str]:
    d = kernels.HERE / "build"
    return {p.name for p in d.iterdir()} if d.exists() else set()


@avx512
def test_a_compile_error_is_reported_with_its_log(tmp_path):
    # A "compiler" that fails the way g++ does: an error on stderr, exit 1.
    cxx = tmp_path / "fake-cxx"
    cxx.write_text("#!/bin/sh\necho 'gemv.cpp:1:1: error: this compiler always fails' >&2\nexit 1\n")
    cxx.chmod(0o755)
    before = builds()
    r = child(["-c", STATUS], tmp_path, CXX=str(cxx))
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    log = tmp_path / "cache" / "kernels" / "build.log"
    assert st["active"] is False and st["gemv"] == [] and st["build"] is None
    assert "compile failed (exit 1)" in st["reason"] and str(log) in st["reason"] and st["log"] == str(log)
    text = log.read_text()
    assert text.startswith(f"$ {cxx} ") and "module.cpp" in text and "this compiler always fails" in text
    assert not list(log.parent.glob(".build.*"))  # written under a temp name, then renamed
    assert builds() == before  # no half-built directory is left next to the sources


@avx512
def test_a_missing_compiler_is_reported(tmp_path):
    r = child(["-c", STATUS], tmp_path, CXX=str(tmp_path / "no-such-cxx"))
    st = json.loads(r.stdout)
    assert st["active"] is False and "not runnable" in st["reason"] and "set CXX" in st["reason"]
    assert (tmp_path / "cache" / "kernels" / "build.log").exists()


def test_switched_off_by_the_environment(tmp_path):
    st = json.loads(child(["-c", STATUS], tmp_path, HETERO_KERNELS="0").stdout)
    assert st == {**st, "active": False, "reason": "HETERO_KERNELS=0", "fused_decode": False}


@avx512
def test_the_build_command_warns_in_one_line(tmp_path):
    # What `make install` prints when the kernels cannot be built (and it goes on: exit 1 is ignored).
    r = child(["-m", "hetero.ops.kernels"], tmp_path, CXX="false")
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1
    assert lines[0].startswith("warning: compiled kernels unavailable: compile failed")
    assert str(tmp_path / "cache" / "kernels" / "build.log") in lines[0]


def test_status_agrees_with_get():
    kernels.set_enabled(True)
    st = kernels.status()
    assert st["active"] == (kernels.get() is not None)
    if st["active"]:
        assert st["reason"] is None and st["gemv"] == ["fp32", "bf16", "int8", "int4", "q8_0", "q4_0", "q4_1",
                                                       "q4_k", "q5_k", "q6_k"]
        assert Path(st["build"]).exists() and st["int4_bf16_dot"] == bool(kernels.get().has_bf16_dot())
    else:
        assert st["reason"]
    kernels.set_enabled(False)
    try:
        off = kernels.status()
        assert not off["active"] and off["reason"] == "switched off in this process"
    finally:
        kernels.set_enabled(True)


def devices(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(["devices", *argv])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_devices_reports_the_kernels(capsys):
    kernels.set_enabled(True)
    d = json.loads(devices(capsys, "--json"))
    assert d["kernels"] == kernels.status() and d["devices"][0]["name"] == "cpu"
    line = [ln for ln in devices(capsys).splitlines() if ln.startswith("kernels:")]
    assert len(line) == 1
    assert ("fp32/bf16/int8/int4/q8_0/q4_0/q4_1/q4_k/q5_k/q6_k GEMV" in line[0]) == d["kernels"]["active"]
    kernels.set_enabled(False)
    try:
        assert json.loads(devices(capsys, "--json"))["kernels"]["active"] is False
        assert "kernels: torch — compiled kernels off: switched off in this process" in devices(capsys)
    finally:
        kernels.set_enabled(True)
