"""Which NPU sets of one node a replica may use, per node kind."""

from __future__ import annotations

from npuswarm.core.nodes import Topology

RING_SIZE = 4


def _ring(npu_id: int) -> int:
    return npu_id // RING_SIZE


def is_valid_set(npus: frozenset[int], topology: Topology) -> bool:
    """Whether an existing allocation respects the node's rule (used to keep it sticky)."""
    if topology == "any" or not npus:
        return True
    rings = {_ring(i) for i in npus}
    if len(npus) <= RING_SIZE:
        return len(rings) == 1
    # Larger jobs take whole rings (8 NPUs = both rings of a 910A node).
    return all(sum(1 for i in npus if _ring(i) == r) == RING_SIZE for r in rings)


def choose(free: frozenset[int], count: int, topology: Topology) -> frozenset[int] | None:
    """Pick ``count`` NPUs out of ``free`` leaving the least fragmented rest; None if impossible.

    Lowest ids first keeps the choice deterministic and packs NPUs from one end of the node.
    """
    if count <= 0 or len(free) < count:
        return None
    if topology == "any":
        return frozenset(sorted(free)[:count])
    by_ring: dict[int, list[int]] = {}
    for npu_id in sorted(free):
        by_ring.setdefault(_ring(npu_id), []).append(npu_id)
    if count <= RING_SIZE:
        fitting = [(len(ids), ring) for ring, ids in by_ring.items() if len(ids) >= count]
        if not fitting:
            return None
        # Best fit among rings: the fullest ring that still fits keeps whole rings free.
        _, ring = min(fitting)
        return frozenset(by_ring[ring][:count])
    whole_rings = [ring for ring, ids in sorted(by_ring.items()) if len(ids) == RING_SIZE]
    needed = count // RING_SIZE
    if count % RING_SIZE or len(whole_rings) < needed:
        return None
    return frozenset(i for ring in whole_rings[:needed] for i in by_ring[ring])
