"""Give freed heap memory back to the operating system between the phases of a long streaming stage.

glibc's ``malloc`` keeps the memory that Python, numpy and torch free inside its heap, and hands it back
only from the top of the heap: pages freed below a block still in use stay resident. A stage that makes
many short-lived arrays per object (PRMS's masked images, the walks' seeds) then keeps a heap that grows
with the number of objects it has processed, although nothing it holds does (measured by
``bench.pseudo_masks_memory``: about 35-45 KB an object before this). ``malloc_trim(0)`` returns every
whole free page of the heap. Elsewhere (musl, macOS) this is a no-op: the allocator is another one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from functools import cache


@cache
def _malloc_trim() -> ctypes._CFuncPtr | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Collect garbage cycles and return the heap's free pages to the OS; True if the allocator could."""
    gc.collect()
    trim = _malloc_trim()
    return bool(trim is not None and trim(0))
