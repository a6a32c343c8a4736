"""How placement and planning scale with the cluster: python bench/placement.py

Prints seconds per full placement (every deployment, every replica) for clusters of 5 to 500
nodes of 8 NPUs, half full of running replicas, plus the ratio to the 5-node case. Not a test:
numbers depend on the machine, which the output names.
"""

from __future__ import annotations

import os
import platform
import time
from datetime import UTC, datetime

from npuswarm.core.nodes import NodeInfo
from npuswarm.core.placement import Allocation, ReplicaRequest, place

NOW = datetime(2026, 11, 30, tzinfo=UTC)


def cluster(nodes: int) -> tuple[list[NodeInfo], list[ReplicaRequest], list[Allocation]]:
    infos = [
        NodeInfo(id=f"n{i:04d}", hostname=f"host{i:04d}", state="ready", availability="active",
                 npus=frozenset(range(8)))
        for i in range(nodes)
    ]
    requests: list[ReplicaRequest] = []
    claims: list[Allocation] = []
    # Half the NPUs run replicas of 4; as many again are asked for by new deployments.
    for i, node in enumerate(infos):
        deployment = f"ns/running{i % 50}"
        slot = str(i)
        requests.append(ReplicaRequest(deployment=deployment, slot=slot, npus=4))
        claims.append(Allocation(deployment=deployment, slot=slot, node_id=node.id,
                                 npus=frozenset(range(4)), service=f"svc{i}"))
        requests.append(ReplicaRequest(deployment=f"ns/new{i % 50}", slot=str(i), npus=2))
    return infos, requests, claims


def measure(nodes: int, rounds: int = 5) -> float:
    infos, requests, claims = cluster(nodes)
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        result = place(infos, requests, claims, now=NOW, lost_node_grace_seconds=60)
        best = min(best, time.perf_counter() - started)
    assert not result.unplaced
    return best


def main() -> None:
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}")
    base = None
    for nodes in (5, 50, 500):
        seconds = measure(nodes)
        base = base or seconds
        print(f"{nodes:>4} nodes, {2 * nodes:>5} replicas: {seconds * 1000:8.2f} ms "
              f"(x{seconds / base:6.1f} of 5 nodes, {nodes / 5:>5.0f}x the cluster)")


if __name__ == "__main__":
    main()
