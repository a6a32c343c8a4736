"""The operator's heap at fleet size: the cyclic garbage collector's share of the CPU, and the
memory a burst leaves behind.

Measured on bench/fleet.py at 1,000 nodes x 2,000 deployments (docs/performance.md): in a
quiet steady state a third of the operator's CPU was CPython's full collections, six a
minute of 0.3 s each, every one walking the millions of objects that live as long as the
operator does (kopf's indexes, every deployment's model, the last pass's snapshot). Two
changes, both standard for a long-lived process with a large heap:

- ``tune()`` at startup: a young generation of 50,000 objects instead of 700, so that a pass
  (a few hundred thousand short-lived objects) is not interrupted hundreds of times, and
  fewer survivors are promoted to be walked again;
- ``settle()`` after a burst (a fleet's first pass, a mass update) and every
  ``SETTLE_SECONDS``: one full collection, then ``gc.freeze()``: what is alive then is moved
  out of the collector's view, so later full collections walk only what changed since.
  Frozen objects are still freed by reference counting; the next settle unfreezes first, so
  a reference cycle among them is reclaimed at the latest then. Then glibc gives freed heap
  back to the OS (``malloc_trim``): its arenas would otherwise keep the burst's peak
  resident for the operator's whole life.

And ``tune()`` caps glibc's malloc arenas at two (MALLOC_ARENA_MAX=2): dozens of writer and
reader threads each got an arena of their own, which kept a start's peak resident.

``trim()`` after a pass, at most every ``TRIM_SECONDS``: glibc returns freed memory to the
OS by itself only from the top of its heap, and a pass's garbage (every observation decodes
about 8 MB of Engine JSON into a few hundred thousand objects) is freed all over it. At
1,000 nodes x 2,000 deployments, 220 of the operator's 620 MiB resident were such free pages
two minutes after a start; one ``malloc_trim`` gave them back (bench/fleet.py, 2026-12-06).

``npuswarm_gc_seconds_total{generation}`` says what the collector still costs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import time
from typing import Any

from npuswarm import metrics

GC_THRESHOLDS = (50_000, 20, 10)
M_ARENA_MAX = -8  # glibc's mallopt parameter
MALLOC_ARENAS = 2
# A quiet operator settles this often too: objects promoted since the last freeze (a new
# deployment's model, a node's readings) leave the collector's view again.
SETTLE_SECONDS = 600.0
# Freed heap pages go back to the OS this often (after a pass: what allocates is the pass).
TRIM_SECONDS = 60.0


class GcTimer:
    """Thread CPU time of each collection, by generation (a gc callback: runs on the thread
    that triggered the collection, which holds the GIL throughout)."""

    def __init__(self) -> None:
        self._started = 0.0
        # Looked up once: a callback inside a collection should not allocate or take the
        # metric family's lock.
        self._counters = {g: metrics.gc_seconds_total.labels(str(g)) for g in range(3)}

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.thread_time()
            return
        counter = self._counters.get(info.get("generation", -1))
        if counter is not None:
            counter.inc(time.thread_time() - self._started)


_timer = GcTimer()


def tune() -> None:
    gc.set_threshold(*GC_THRESHOLDS)
    if _timer not in gc.callbacks:
        gc.callbacks.append(_timer)
    # glibc gives each thread that allocates its own arena (up to 8 per core); the operator's
    # writer and reader pools (dozens of threads) then spread a burst's garbage over arenas
    # that are never given back. Two arenas, as MALLOC_ARENA_MAX=2 would, before the pools
    # start (a no-op where mallopt does not exist).
    mallopt = _libc_function("mallopt")
    if mallopt is not None:
        mallopt(M_ARENA_MAX, MALLOC_ARENAS)


def settle() -> None:
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    trim()


def trim() -> None:
    """Give glibc's free heap pages back to the OS (a no-op where malloc_trim does not exist);
    its CPU time is counted in npuswarm_malloc_trim_seconds_total."""
    malloc_trim = _libc_function("malloc_trim")
    if malloc_trim is None:
        return
    started = time.thread_time()
    malloc_trim(0)
    metrics.malloc_trim_seconds_total.inc(time.thread_time() - started)


@functools.cache
def _libc_function(name: str) -> Any:
    """Looked up once: find_library runs ldconfig."""
    libc = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(libc), name, None) if libc is not None else None
