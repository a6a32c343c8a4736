"""Which replicas a scale-down stops (docs/autoscaling.md, "Which replica stops"). Pure.

A replica is a slot ("0", "1", ...) with its own Swarm service; a service cannot be renamed
without restarting its model, so a smaller count keeps *some* slots rather than the lowest
ones. The rule, first stopped first:

1. replicas that are not ready (no task running the current spec: still loading, failing,
   on a node that is down): stopping them costs no client anything;
2. then the newest: the one whose current task started last (its prefix cache is the
   coldest, and it is the one a flapping load most likely just added);
3. then the highest slot.

A larger count keeps every slot and adds the lowest free ones. PerNode and multi-node
deployments keep their own slot rules (a node id; a group of members).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from npuswarm.api.deployment import ModelDeployment
from npuswarm.core.snapshot import ObservedService


def kept_slots(
    md: ModelDeployment, by_slot: Mapping[str, Sequence[ObservedService]]
) -> list[str] | None:
    """The slots the deployment's replicas take this pass, or None for the default
    (PerNode, multi-node, or nothing to choose: exactly the first ``replicas`` slots)."""
    spec = md.spec
    if spec.mode != "Replicated" or spec.multi_node:
        return None
    count = spec.replicas
    existing = [slot for slot in by_slot if slot.isdigit()]
    if all(int(slot) < count for slot in existing):
        return None  # the common case: slots 0..count-1, some of them running
    if len(existing) > count:
        ranked = sorted(existing, key=lambda slot: _stop_order(slot, by_slot[slot]))
        stopped = set(ranked[: len(existing) - count])
        return sorted((slot for slot in existing if slot not in stopped), key=int)
    kept = set(existing)
    index = 0
    while len(kept) < count:
        if str(index) not in kept:
            kept.add(str(index))
        index += 1
    return sorted(kept, key=int)


def _stop_order(slot: str, services: Sequence[ObservedService]) -> tuple[bool, float, int]:
    """Ascending: the first to stop first (not ready, then newest, then highest slot)."""
    ready = any(s.running_current_spec for s in services)
    started = [s.newest_task.created.timestamp() for s in services if s.newest_task is not None]
    # No task yet: as new as can be.
    newest = max(started) if started else float("inf")
    return (ready, -newest, -int(slot))
