"""host_buffer: private anonymous memory, advised onto huge pages when large enough."""
import ctypes
import sys
from pathlib import Path

import pytest

from hetero.pagebuf import HUGE, host_buffer


def vm_flags(buf) -> list[str] | None:
    """VmFlags of the mapping that holds `buf` in /proc/self/smaps (Linux only)."""
    smaps = Path("/proc/self/smaps")
    if not smaps.exists():
        return None
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    inside = False
    for line in smaps.read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
            mapping = line
        elif inside and line.startswith("VmFlags:"):
            assert "/dev/zero" not in mapping and "SYSV" not in mapping  # private, not shmem
            return line.split()[1:]
    return None


def test_buffer_is_zeroed_writable_and_exact():
    buf = host_buffer(3 * HUGE + 4096)
    assert len(buf) == 3 * HUGE + 4096
    assert buf[:16] == bytes(16) and buf[-16:] == bytes(16)
    buf[5] = 7
    assert buf[5] == 7
    buf.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmFlags are Linux's")
def test_large_buffer_is_advised_huge_small_one_is_not():
    big, small = host_buffer(4 * HUGE), host_buffer(HUGE // 2)
    flags_big, flags_small = vm_flags(big), vm_flags(small)
    assert flags_big is not None and flags_small is not None
    assert "hg" in flags_big            # MADV_HUGEPAGE took
    assert "hg" not in flags_small      # too small to hold a huge page: left alone
    assert "hg" not in vm_flags(host_buffer(4 * HUGE, huge=False))
