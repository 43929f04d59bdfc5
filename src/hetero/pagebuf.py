"""Host buffers for O_DIRECT reads, on transparent huge pages where the kernel offers them.

An O_DIRECT read moves data straight into the user buffer, and the block layer cuts a request at
every break in the buffer's *physical* memory. On 4 KiB pages scattered over RAM that caps a
request near 0.5 MiB here (a virtio disk's segment limit); on 2 MiB huge pages the requests reach
the device's 4 MiB maximum, and this machine's disk reads 2.3-2.8 GB/s instead of 0.8-1.1 GB/s
(`benchmarks/hardware_check.py`). So every buffer the disk tier reads into comes from here.

The mapping is private and anonymous (shared anonymous memory is shmem, which only gets huge pages
when the system's shmem_enabled allows it) and advised MADV_HUGEPAGE; where the kernel has no THP or
refuses the advice the buffer still works, on small pages.
"""
from __future__ import annotations

import mmap

HUGE = 2 << 20  # x86-64 / arm64 (4 KiB base pages) PMD size


def host_buffer(nbytes: int, huge: bool = True) -> mmap.mmap:
    """`nbytes` of zeroed, page-aligned, writable memory that the caller owns; close() frees it.
    The length is not rounded to huge pages: the kernel backs the whole 2 MiB stretches inside the
    mapping with huge pages and its ends with small ones, and reads as fast (measured) without
    the up to 2 MiB a rounding would add to every resident unit.

    `huge=False` gives plain small pages (what a malloc'd buffer of another program gets)."""
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    buf = mmap.mmap(-1, nbytes, flags=flags) if flags else mmap.mmap(-1, nbytes)
    if huge and nbytes >= HUGE and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass  # no THP in this kernel, or disabled: small pages still read correctly
    return buf
