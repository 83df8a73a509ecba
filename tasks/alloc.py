"""glibc's allocator kept from handing large blocks back to the kernel after every image.

By default glibc serves each block over 128 KB with its own ``mmap`` and unmaps it on free (the
threshold then creeps up as blocks are freed, which is why a first pass over new image sizes is
slower than the next). The signals allocate many 1-6 MB temporaries per image (BRISQUE's float64
planes, views, model inputs): mapping and faulting those pages in again every time was half of
BRISQUE's MSCN step. Raising the thresholds once per process lets the heap reuse them; a process
keeps at most ``TRIM`` bytes of free heap beyond what it peaked at using. A no-op off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from functools import cache

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP = 32 << 20  # glibc's ceiling for the mmap threshold on 64-bit: larger blocks still get mmap
TRIM = 128 << 20


@cache
def keep_large_allocations() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); False where not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM))
    except (OSError, AttributeError):
        return False
