"""runtime/heap.py: the collector's thresholds, its cost in a metric, and the freeze after a
burst (process-wide state: each test puts it back as it found it)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from npuswarm import metrics
from npuswarm.runtime import heap


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds, callbacks = gc.get_threshold(), list(gc.callbacks)
    yield
    gc.set_threshold(*thresholds)
    gc.callbacks[:] = callbacks
    gc.unfreeze()


def spent(generation: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "npuswarm_gc_seconds_total", {"generation": generation}
    )
    assert value is not None, "every generation's series exists from the start"
    return value


def test_tune_raises_the_young_generation_and_counts_every_collection(restored_gc: None) -> None:
    heap.tune()
    heap.tune()  # the operator's startup may run twice in one process (tests): one callback
    assert gc.get_threshold() == heap.GC_THRESHOLDS
    assert sum(1 for c in gc.callbacks if isinstance(c, heap.GcTimer)) == 1
    before = spent("2")
    garbage = [[] for _ in range(200_000)]
    for item in garbage:
        item.append(item)  # cycles: only the collector frees them
    del garbage
    gc.collect()
    assert spent("2") > before


def test_settle_moves_what_lives_out_of_the_collectors_view_and_frees_cycles_first(
    restored_gc: None,
) -> None:
    class Node:
        pass

    cycle = Node()
    cycle.self = cycle  # type: ignore[attr-defined]
    alive = weakref.ref(cycle)
    gc.freeze()  # an earlier settle froze it while it was alive
    del cycle
    gc.collect()
    assert alive() is not None, "frozen: out of the collector's view"
    heap.settle()
    assert alive() is None, "the settle unfroze and collected it"
    assert gc.get_freeze_count() > 0
    frozen = gc.get_freeze_count()
    heap.settle()
    assert gc.get_freeze_count() <= frozen + 1000, "a second settle refreezes, not adds up"


def resident_mib() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def test_trim_gives_the_heap_pages_a_pass_freed_back_and_counts_its_time() -> None:
    """A pass's garbage is freed all over the heap: glibc keeps those pages resident (it
    returns only the top of its heap by itself) until malloc_trim."""
    if heap._libc_function("malloc_trim") is None:
        pytest.skip("no glibc malloc_trim here")
    blocks = [bytes(10_000) for _ in range(30_000)]  # 300 MB through malloc, not pymalloc
    kept = blocks[::10]  # what outlives the pass, spread over the heap: no free top to give back
    del blocks
    freed = resident_mib()
    before = metrics.REGISTRY.get_sample_value("npuswarm_malloc_trim_seconds_total") or 0.0
    heap.trim()
    assert resident_mib() < freed - 100, (freed, resident_mib())
    assert (metrics.REGISTRY.get_sample_value("npuswarm_malloc_trim_seconds_total") or 0.0) > before
    assert len(kept) == 3000
