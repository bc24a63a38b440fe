"""glibc's allocator set for a process that allocates and frees the same large buffers batch after batch.

By default glibc gives freed memory back to the kernel, and the next allocation takes it back: a
page fault per 4 KiB page, each page zeroed by the kernel. Two of its rules do that to an encoder,
which frees and reallocates its activations at every layer of every batch:
- a block of 32 MiB or more (an activation of a 256x256 clip) is mapped on its own, and unmapped
  as soon as it is freed;
- freed memory at the top of the heap is trimmed once more than a threshold of it is free (128 KiB
  at first, twice the largest unmapped block later), and after a batch nearly all of it is.
On CPU its process spent a fifth of its time in the kernel at 64x64, and half of it at 256x256.
Here no block is mapped apart and nothing is trimmed: the next batch's buffers come from memory
that the last one freed. The price is host memory: the process keeps its peak, and freed blocks
beside it that a larger request does not fit. torch aligns its blocks to 64 bytes, and glibc (2.36
here) keeps the few bytes of slack around each such block in its per-thread cache, between freed
blocks that would otherwise merge. How far the heap grows past its peak depends on the
order of the shapes and has no fixed cap: about twice what the process holds with glibc's defaults
(the table), and 40 batches of five mixed shapes levelled off at 3.7 GiB against a 1.9 GiB peak.

    reuse_freed_memory()   # once, in the process that runs the model (`run.reuse_host_memory`)

flux-ae-tiny on 2 CPU cores (Intel Xeon, glibc 2.36), frames/s: its encoder alone on random clips of
8x256x256 (batch 1 and 4) and 8x64x64 (batch 4), and a shard encoder in-process on 36 generated
clips of 16x256x256 (batch 4), with that process's peak resident memory:

| glibc's allocator                               | 256, batch 1 | 256, batch 4 | 64, batch 4 | shard encoder     |
|-------------------------------------------------|--------------|--------------|-------------|-------------------|
| its defaults                                    | 10.8         | 11.0         | 249 to 290  | 8.0, 3.2 GiB      |
| mapped apart from 32 MiB, 512 MiB kept (before) | 9.8          | 7.2          | 380 to 392  | 7.2, 3.3 GiB      |
| nothing mapped apart or trimmed (this)          | 20.7         | 20.6         | 367 to 381  | 15.3-15.9, 6.0 GiB|
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (malloc.h)
M_MMAP_MAX = -4
NEVER_TRIM = -1  # (M_TRIM_THRESHOLD's value for "never", as mallopt(3) documents it)


def reuse_freed_memory() -> bool:
    """Sets this process's allocator to keep freed memory for reuse; False where the C library is
    not glibc (musl, macOS), which is then left as it is.

    The model runs on the main thread, whose heap grows without bound. Other threads allocate from
    heaps of at most 64 MiB each: a block larger than that is still mapped on its own (glibc's
    fallback there ignores M_MMAP_MAX), and unmapped when it is freed."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    done = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1
    if not done:
        log.warning("mallopt refused the allocator's settings; freed host memory goes back to the kernel")
    return done
