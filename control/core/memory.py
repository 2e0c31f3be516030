"""Process memory settings for processes that move megabytes per request.

glibc serves an allocation above its mmap threshold (128 KiB at first, raised as big
blocks are freed) with a fresh mmap, and returns freed memory at the top of the heap to
the kernel beyond its trim threshold; either way the next request's buffers are new
pages, and each page is a fault and a zeroing. A 1 MiB key costs a key API worker about
700 page faults that way (its base64, the ZeroMQ message, the TLS output): a third of
its CPU time. Keeping freed memory for reuse removes them.
"""

from __future__ import annotations

import contextlib
import ctypes

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20   # glibc's largest: allocations below it come from the heap
TRIM_THRESHOLD = 128 << 20  # free memory kept at the heap's top before giving it back


def keep_freed_memory() -> bool:
    """Reuse freed memory instead of mapping new pages; False where not glibc."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
            bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return False
