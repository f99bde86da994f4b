"""The operator gives freed C-heap memory back to the kernel (issue 13, ``tideflow_operator.heap``).

Proves, with glibc itself (skipped where the C library is not glibc): memory
a burst allocated and freed around a few survivors stays resident until
:class:`HeapTrim` trims, and is given back when it does; the trim runs at
most every ``every_seconds``; the arena cap is accepted; the housekeeping
round is what calls the trim.  In fresh interpreters: a test process's heap
says little after everything pytest allocated.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tideflow_operator import heap

GLIBC = heap._libc() is not None
needs_glibc = pytest.mark.skipif(not GLIBC, reason="the C library is not glibc (no malloc_trim)")

# A burst: 40 MB in 4 KB chunks (below glibc's mmap threshold: they share the heap),
# every one touched; all freed but every 64th, which pins the heap's top so that
# only a trim of its middle can give the rest back.
BURST = """
import ctypes, json, sys
from tideflow_operator.heap import HeapTrim

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 1e6

trim = HeapTrim(every_seconds=float(sys.argv[1]))
chunks = [libc.malloc(4096) for _ in range(10_000)]
for c in chunks:
    ctypes.memset(c, 1, 4096)
peak = rss_mb()
for i, c in enumerate(chunks):
    if i % 64:
        libc.free(c)
freed = rss_mb()
trimmed = trim.maybe()
print(json.dumps({"peak": peak, "freed": freed, "after": rss_mb(), "trimmed": trimmed}))
"""


def burst(every_seconds: float) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", BURST, str(every_seconds)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out.stdout)
    return result


@needs_glibc
def test_memory_freed_around_survivors_stays_resident_until_trimmed_and_goes_back_after() -> None:
    # Not yet time to trim: free() alone keeps nearly all of the burst resident.
    kept = burst(every_seconds=3600)
    assert kept["trimmed"] is False
    assert kept["peak"] - kept["freed"] < 10, kept
    assert kept["after"] - kept["freed"] < 10, kept
    # The trim gives back what was freed (all but the survivors' pages: 1 in 64).
    given = burst(every_seconds=0)
    assert given["trimmed"] is True
    assert given["freed"] - given["after"] > 30, given


def test_the_trim_runs_at_most_every_every_seconds() -> None:
    calls: list[int] = []

    class Libc:
        def malloc_trim(self, pad: int) -> int:
            calls.append(pad)
            return 1

    now = [100.0]
    trim = heap.HeapTrim(10.0, libc=Libc(), clock=lambda: now[0])
    assert trim.maybe() is False  # (its clock starts when it is made)
    now[0] = 109.9
    assert trim.maybe() is False
    now[0] = 110.0
    assert trim.maybe() is True
    now[0] = 115.0
    assert trim.maybe() is False
    assert calls == [0] and trim.trims == 1


def test_without_glibc_nothing_is_called() -> None:
    trim = heap.HeapTrim(0.0, libc=None)
    trim.libc = None
    assert trim.maybe() is False
    assert heap.limit_arenas(libc=None) is (GLIBC and heap.limit_arenas())


@needs_glibc
def test_the_arena_cap_is_accepted_by_glibc() -> None:
    code = "from tideflow_operator.heap import limit_arenas; print(limit_arenas())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


async def test_the_housekeeping_round_is_what_trims() -> None:
    from tideflow_operator.housekeeping import Housekeeper

    class Trim(heap.HeapTrim):
        def __init__(self) -> None:
            super().__init__(0.0, libc=None)
            self.asked = 0

        def maybe(self) -> bool:
            self.asked += 1
            return False

    class Nothing:
        """The collaborators of a round with nothing to do."""

        def sites(self) -> list[str]:
            return []

        async def flush(self, **_: Any) -> None:
            return None

        def all(self) -> list[Any]:
            return []

    from tideflow_operator.model import Held

    trim = Trim()
    keeper = Housekeeper(
        Nothing(), Nothing(), Nothing(), Nothing(), Nothing(), Held(), None,  # type: ignore[arg-type]
        namespaces=[], every_seconds=1.0, reconcile_seconds=3600.0, heap=trim,
    )  # fmt: skip
    keeper.last_reconcile = float("inf")
    await keeper.round()
    await keeper.round()
    assert trim.asked == 2
