"""glibc's allocator set for a process that allocates and frees the same large buffers batch after batch.

By default glibc returns freed memory at the top of its heap to the kernel as soon as more than a
small threshold (128 KiB at first, twice the largest freed block later) is free, and the next
allocation takes it back: a page fault per 4 KiB page, each page zeroed by the kernel. An encoder
on CPU frees and reallocates its activations at every layer of every batch, and its process spent
a fifth of its time in the kernel that way (`benchmarks/throughput.py --techniques default-malloc`:
the model at 131 frames/s inside the job, 164 with this). Here freed memory stays in the heap, up to
`TRIM_THRESHOLD`, for the next batch to reuse; blocks of `MMAP_THRESHOLD` or more are still
mapped and unmapped on their own.

    reuse_freed_memory()   # once, in the process that runs the model (`run.reuse_host_memory`)
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's own highest dynamic threshold on 64-bit
TRIM_THRESHOLD = 512 * 2**20  # the most freed memory a process keeps at its heap's top


def reuse_freed_memory() -> bool:
    """Sets this process's allocator to keep freed memory for reuse; False where the C library is
    not glibc (musl, macOS), which is then left as it is."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    # (either call alone fixes the other threshold at its start value: both are set)
    done = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not done:
        log.warning("mallopt refused the allocator's thresholds; freed host memory goes back to the kernel")
    return done
