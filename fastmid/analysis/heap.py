"""Keep freed CPU tensor memory in the process instead of returning it to the OS (glibc only).

``fastmid analyze`` holds one batch's outputs of every decoder layer of both models (tens to
hundreds of MiB), frees them, and allocates them again for the next batch. glibc's ``malloc``
serves blocks this large with ``mmap`` (or trims them off the heap) and hands them back to the
kernel on ``free``, so every batch pays the page faults of touching fresh, zeroed memory again:
measured on the 2-core CPU machine, the forward passes with the layer outputs kept ran ~10-15%
slower than bare ones, and the statistics' float64 temporaries paid the same toll. PyTorch's CPU
performance guide recommends an allocator that keeps memory (jemalloc, tcmalloc); these are the
equivalent glibc settings (``mallopt``, see ``man 3 mallopt``), applied once per process.

Limit: glibc serves other threads from their own arenas, whose heaps are capped at 64 MiB, so a
block of 64 MiB or more allocated on a statistics worker thread is still mapped fresh each time
(for SmolLM2 at batch size 8 every per-layer block stays far below that; for hidden sizes of a
few thousand and 8 x 512-token batches the float64 CKA rows built on the workers do not). That
costs speed only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Blocks below this many bytes come from the heap (not mmap); glibc's own dynamic threshold
#: never exceeds 32 MiB, too small for a batch of long sequences.
MMAP_THRESHOLD_BYTES = 1 << 30
#: Free memory kept at the top of the heap before trimming returns it to the OS (mallopt takes
#: an int, so 2 GiB is the most it accepts).
TRIM_THRESHOLD_BYTES = 2**31 - 1


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's ``M_MMAP_THRESHOLD`` to 1 GiB and ``M_TRIM_THRESHOLD`` to 2 GiB, once.

    Afterwards the process keeps up to 2 GiB of freed memory for reuse instead of returning it
    to the kernel (its resident size stays at its peak). Process-wide: call it from a command's
    entry point, not from library code that others import.

    Returns:
        True when the settings were applied; False off Linux/glibc (other allocators already
        keep memory, or offer their own settings), or when ``mallopt`` refused them.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    return mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and ok
