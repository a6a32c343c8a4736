"""What priority, quotas and preemption cost a pass: python bench/preemption.py

Steps 2 (placement, with the namespaces' quotas) and 2b (preemption) of one pass, pure, on
1,000 nodes of 8 NPUs full of 2,000 priority-0 replicas of 4 NPUs, with newcomers that are or
are not allowed to preempt; then the autoscaler's headroom on such a full fleet, where
autoscaled deployments want more replicas than the free NPUs hold (core/autoscale.py: with
a higher priority it asks the pass's preemption on a scratch copy of the placement). Not a test: numbers depend on the machine, which the output names;
the best of 3 runs. The fleet figure end to end is bench/fleet.py's (every deployment at
priority 0 there).
"""

from __future__ import annotations

import os
import platform
import time
from datetime import UTC, datetime
from typing import Any

from npuswarm.api.deployment import ModelDeployment
from npuswarm.core.autoscale import headroom
from npuswarm.core.nodes import NodeInfo
from npuswarm.core.placement import Allocation, by_priority, place_all
from npuswarm.core.preemption import preempt, ranks
from npuswarm.core.quota import Quotas

NOW = datetime(2026, 11, 30, tzinfo=UTC)
NODES, DEPLOYMENTS = 1000, 2000


def deployment(name: str, namespace: str, index: int, **spec: Any) -> ModelDeployment:
    created = f"2026-01-01T{index // 3600 % 24:02d}:{index // 60 % 60:02d}:{index % 60:02d}Z"
    return ModelDeployment.model_validate({
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", "generation": 1,
                     "creationTimestamp": created},
        "spec": {"image": "vllm-ascend:bench", "model": f"/models/{name}", "npusPerReplica": 4, **spec},
    })


def main() -> None:
    nodes = [NodeInfo(id=f"n{i:04d}", hostname=f"host{i:04d}", state="ready", availability="active",
                      npus=frozenset(range(8))) for i in range(NODES)]
    low = [deployment(f"d{i:04d}", f"ns{i % 20}", i) for i in range(DEPLOYMENTS)]
    first = place_all(by_priority(low), nodes, [], now=NOW, lost_node_grace_seconds=60)
    running = [Allocation(deployment=a.deployment, slot=a.slot, node_id=a.node_id, npus=a.npus,
                          service=f"s{k}") for k, a in enumerate(first.assignments.values())]
    print(f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{NODES} nodes x 8 NPUs, {DEPLOYMENTS} replicas of 4 NPUs running (full)")

    def timed(label: str, extra: list[ModelDeployment], quotas: Quotas | None = None) -> None:
        everyone = by_priority(low + extra)
        runs = []
        for _ in range(3):
            started = time.perf_counter()
            result = place_all(everyone, nodes, running, now=NOW, lost_node_grace_seconds=60,
                               admit=quotas.admit if quotas else None)
            placed = time.perf_counter()
            outcome = preempt(result, ranks(everyone))
            runs.append((placed - started, time.perf_counter() - placed, len(outcome.preemptions)))
        place_s, preempt_s, count = min(runs)
        print(f"  {label:52s} place {place_s * 1000:6.1f} ms  preempt {preempt_s * 1000:6.1f} ms"
              f"  ({count} preemptions)")

    timed("nothing pending", [])
    timed("every namespace under a quota", [], Quotas({f"ns{i}": 400 for i in range(20)}))
    timed("+500 priority-0 newcomers (nobody to preempt)",
          [deployment(f"eq{i}", "new", DEPLOYMENTS + i) for i in range(500)])
    timed("+500 priority-10 newcomers, selector matching no node",
          [deployment(f"nx{i}", "new", DEPLOYMENTS + i, priority=10, nodeSelector={"none": "x"})
           for i in range(500)])
    timed("+50 priority-10 newcomers",
          [deployment(f"hi{i}", "new", DEPLOYMENTS + i, priority=10) for i in range(50)])
    timed("+500 priority-10 newcomers",
          [deployment(f"hi{i}", "new", DEPLOYMENTS + i, priority=10) for i in range(500)])
    timed("+1 priority-10 deployment of 500 replicas",
          [deployment("wide", "new", DEPLOYMENTS, priority=10, replicas=500)])

    def headroom_timed(label: str, priority: int, count: int, more: int) -> None:
        """``count`` autoscaled deployments of ``priority`` running one replica each (the
        fleet full), each wanting ``more`` replicas more."""
        scaled = [deployment(f"as{i}", "scaled", i, priority=priority,
                             autoscaling={"maxReplicas": 64, "target": {
                                 "metric": "requestsWaitingPerReplica", "value": 1}})
                  for i in range(count)]
        everyone = by_priority(low[count:] + scaled)
        full = place_all(everyone, nodes, [], now=NOW, lost_node_grace_seconds=60)
        wanted = {md.key: 1 + more for md in scaled}
        rank = ranks(everyone)
        runs = []
        for _ in range(3):
            started = time.perf_counter()
            room = headroom(full, nodes, wanted, ranks=rank)
            runs.append((time.perf_counter() - started, sum(room.values()) - count))
        took, gained = min(runs)
        print(f"  headroom: {label:42s} {took * 1000:6.1f} ms  (+{gained} replicas counted)")

    headroom_timed("50 priority-0 autoscaled want +2 each", 0, 50, 2)
    headroom_timed("50 priority-10 autoscaled want +2 each", 10, 50, 2)
    headroom_timed("500 priority-10 autoscaled want +1 each", 10, 500, 1)


if __name__ == "__main__":
    main()
