"""The C heap of the operator process: fewer malloc arenas, and free pages given back.

Why (issue 13: the operator at most 400 MB at 10,000 Workflows): measured with
``python -m bench.fleet --tracemalloc FILE`` (its heap report), most of what
a wave of Workflows added to the operator's RSS was not live data but memory
the allocators had freed and kept: at 2,000 Workflows over 200 sites, 119 MB
added, of which 16 MB live objects, 56 MB free blocks inside pymalloc's
arenas and 30 MB free inside glibc's.  A burst (watch events of whole
objects, API responses, sites' batches resent while acks lag) is transient;
what outlives it is scattered among its pages, which stay resident.

What this module does, glibc only (elsewhere each call is a no-op):

* :func:`limit_arenas` caps glibc's malloc arenas (``M_ARENA_MAX``) before the
  operator starts its threads: glibc gives each thread that allocates at once
  an arena of its own (up to 8 per core), the API client's threads (kube.py:
  32 for admissions, 4 for Events, the default executor) fill them during a
  burst, and the memory each one frees stays in it.
* :class:`HeapTrim` calls ``malloc_trim(0)`` from housekeeping at most every
  ``every_seconds``: glibc then returns every wholly free page of every arena
  to the kernel (``MADV_DONTNEED``), not only the top of the main heap.

Nothing here changes what the operator does; it changes what stays resident.
Python's own small-object allocator (pymalloc) gives an arena back only when
all of it is free, and the trim does not reach inside it.  Running with
``PYTHONMALLOC=malloc`` (every object in glibc's heap, where the trim reaches
it page by page) was measured and not kept: about the same RSS, and the
operator's CPU for a wave 1.7x (bench/README.md, "fleet", issue 13).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from typing import Any

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc's malloc.h
ARENAS = 2
TRIM_SECONDS = 10.0


def _libc() -> Any | None:
    """glibc, or None (musl, macOS: no ``malloc_trim``)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "malloc_trim") or not hasattr(libc, "mallopt"):
        return None
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def limit_arenas(arenas: int = ARENAS, libc: Any | None = None) -> bool:
    """Cap glibc's malloc arenas (call before threads start); True if set."""
    libc = libc if libc is not None else _libc()
    return libc is not None and bool(libc.mallopt(M_ARENA_MAX, arenas))


class HeapTrim:
    """``malloc_trim(0)`` at most every ``every_seconds`` (housekeeping calls :meth:`maybe`)."""

    def __init__(
        self,
        every_seconds: float = TRIM_SECONDS,
        *,
        libc: Any | None = None,
        clock: Any = time.monotonic,
    ) -> None:
        self.every_seconds = every_seconds
        self.libc = libc if libc is not None else _libc()
        self.clock = clock
        self.last = clock()
        self.trims = 0  # how many times memory was given back (malloc_trim returned 1)

    def maybe(self) -> bool:
        """Trim if it is time; True if glibc gave memory back."""
        now = self.clock()
        if self.libc is None or now - self.last < self.every_seconds:
            return False
        self.last = now
        released = bool(self.libc.malloc_trim(0))
        took = self.clock() - now
        if released:
            self.trims += 1
        log.debug("malloc_trim: %s in %.1f ms", "released" if released else "nothing", took * 1e3)
        return released
