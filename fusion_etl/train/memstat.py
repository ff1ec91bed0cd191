"""Measuring a training process's memory: peak RSS since a mark (CPU), bytes tensors hold.

On CPU the kernel's peak-RSS mark (VmHWM) is reset with `clear_refs` and read back after the
work; glibc returns large allocations to the OS only with a fixed mmap threshold
(`MALLOC_MMAP_THRESHOLD_`), so measurements that compare with the memory plan run with it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

__all__ = ["local_bytes", "peak_rss_bytes", "reset_peak_rss", "rss_bytes"]


def rss_bytes() -> int:
    """This process's resident memory now."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux `clear_refs` 5), so that peak memory is measured
    from here on; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """This process's peak resident memory since the last reset."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def local_bytes(tensors: Iterable[Any]) -> int:
    """Bytes the given tensors hold in this process (a sharded DTensor: its local shard)."""
    return int(sum(t.to_local().nbytes if hasattr(t, "to_local") else t.nbytes for t in tensors))
