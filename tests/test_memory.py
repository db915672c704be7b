"""pipeline.memory: freed heap pages go back to the OS (the reason make_pseudo_masks' memory is flat)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from pipeline.memory import release_free_memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim and /proc are Linux's")
def test_a_fragmented_heap_is_handed_back():
    # 64 KB arrays come from the heap (below glibc's mmap threshold); keeping every 16th alive leaves
    # holes that malloc never returns by itself
    arrays = [np.ones(64 * 1024 // 8) for _ in range(3000)]
    keep = arrays[::16]
    del arrays
    before = _rss_bytes()
    assert release_free_memory()
    released = before - _rss_bytes()
    assert released > 100 * 2**20, f"only {released / 2**20:.0f} MiB of ~180 MiB freed went back"
    assert all(a[0] == 1.0 for a in keep)
