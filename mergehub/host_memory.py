"""Host memory: freed buffers kept in the process for the next tensor's, not returned to the
operating system.

A merge or a live composition allocates and frees buffers of tens to hundreds of MiB for each
tensor (decoded inputs, float32 task vectors, results). glibc's malloc serves each allocation
above its mmap threshold (which it adjusts, up to 32 MiB) with a fresh mapping that it unmaps
on free, and trims the top of its heap when enough is free there, so the next tensor's
buffers are fresh pages again and every first touch of a page is a fault that the kernel
answers with a zeroed page. With both thresholds raised, freed buffers are reused instead.
Threads share the main heap (one arena): a thread's arena of its own is built of 64 MiB heaps,
so it maps any larger buffer afresh each time whatever the thresholds, which a CPU merge's
threads (several tensors at once, :meth:`~mergehub.merge.tensors.TensorMerger.map_tensors`)
do for every embedding-sized tensor.
Measured on the 1B benchmark (TIES of 4 compressed entries, 2 CPUs, `benchmarks/RESULTS.md`,
issue 14): ``hub merge`` 42.0-43.3 s instead of 48.0-51.3 s (0.6 instead of 5.3-6.5 million minor
faults), the first :meth:`Composer.apply` of a process 56.8-58.4 s instead of 72.8-76.1 s;
the shared arena: TIES of 211M parameters on 2 threads 3.06 s instead of 3.43 s (medians of 5,
issue 16, set through ``MALLOC_ARENA_MAX=1``).

The cost: what the process frees stays in it until it exits, and the heap holds a few of the
largest buffers more at its peak (that ``hub merge``: 2.7-3.0 GiB peak RSS instead of
2.3-2.4). ``hub`` (every command) and :class:`mergehub.Composer` ask for it; a program that
calls :func:`mergehub.merge` in a loop can call :func:`keep_freed_memory` itself.
``MERGEHUB_KEEP_FREED_MEMORY=0`` turns it off, and malloc settings a user gave in the
environment (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_ARENA_MAX``,
``GLIBC_TUNABLES``) are left as they are.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
#: the largest value mallopt takes (an int): buffers beyond 2 GiB are still mapped and unmapped
_LARGEST = 2**31 - 1
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX",
                  "GLIBC_TUNABLES")
_kept: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc malloc's mmap and trim thresholds to their largest and let threads share
    one arena (once per process), so that freed buffers are reused by the next allocations
    instead of being unmapped. Returns whether they are: ``False`` on another C library or
    system, when the environment sets malloc's own settings, or with
    ``MERGEHUB_KEEP_FREED_MEMORY=0``."""
    global _kept
    if _kept is None:
        _kept = _raise_thresholds()
    return _kept


def _raise_thresholds() -> bool:
    if (os.environ.get("MERGEHUB_KEEP_FREED_MEMORY", "1") == "0"
            or any(name in os.environ for name in _USER_SETTINGS)
            or not sys.platform.startswith("linux")):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl and others have no such mallopt
    except (OSError, AttributeError):
        return False
    return all(libc.mallopt(param, value) == 1
               for param, value in ((_M_MMAP_THRESHOLD, _LARGEST), (_M_TRIM_THRESHOLD, _LARGEST),
                                    (_M_ARENA_MAX, 1)))
