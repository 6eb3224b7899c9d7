"""Process memory settings for CPU extraction (DELF_MALLOC_TUNE); no torch import here."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

_MALLOC_TUNED = False


def tune_malloc(enabled: bool) -> bool:
    """Keep freed heap memory in the process when `enabled` (DELF_MALLOC_TUNE; glibc on Linux only).

    CPU inference allocates each pyramid level's activations afresh; with glibc's dynamic
    mmap threshold and heap trimming those pages go back to the OS after every layer and
    are page-faulted in again (most of the kernel time of CPU extraction; BENCHMARKS.md,
    "Faster CPU extraction"). A fixed 32 MiB mmap threshold, 1 GiB trim threshold and 1 GiB top
    pad keep them, and one malloc arena for all threads. Process-wide and idempotent (call
    it before starting threads: a thread keeps the arena it already has); returns whether
    it applied."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED or not enabled:
        return _MALLOC_TUNED
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -2, -3, -8
    # One arena: threads other than the main one (the worker's batch thread runs the network)
    # otherwise get arenas of 64 MiB heaps that are unmapped and faulted in again all the time
    # (far more page faults per photo than in the main arena; BENCHMARKS.md, "The 1M-descriptor
    # target on the second machine").
    ok = all(mallopt(opt, value) == 1 for opt, value in (
        (M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 1 << 30),
        (M_ARENA_MAX, 1)))
    _MALLOC_TUNED = ok
    if not ok:
        log.warning("mallopt refused the extractor's memory settings; glibc defaults stay")
    return ok
