#!/usr/bin/env python3
"""CPU of one look at the whole Swarm, Engine JSON parsing included: python bench/observe.py

Seeds the synthetic manager (bench/enginesim.py, in this process) with one running service
per deployment, rendered by npuswarm itself so the JSON has its real size, then times
``Swarm.observe()`` (the four list calls over HTTP with docker-py, JSON decoding and the
snapshot) in CPU seconds of the calling thread, so the server's own threads do not count.
This is the Engine side of section 8's "no-op pass under 1 s of CPU"; the pass's planning
is on top of it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from enginesim import EngineSim  # noqa: E402
from fleet import replace_block  # noqa: E402
from npuswarm.api.deployment import ModelDeployment  # noqa: E402
from npuswarm.core.placement import Assignment  # noqa: E402
from npuswarm.core.render import render_service  # noqa: E402
from npuswarm.swarm import Swarm  # noqa: E402


def seed(sim: EngineSim, deployments: int) -> None:
    node_ids = sorted(sim.nodes, key=lambda n: sim.nodes[n]["Description"]["Hostname"])
    for i in range(deployments):
        md = ModelDeployment.model_validate(
            {
                "metadata": {
                    "name": f"md-{i:05d}",
                    "namespace": "fleet",
                    "uid": f"uid-{i}",
                    "generation": 1,
                },
                "spec": {
                    "image": "sim/vllm:bench",
                    "model": f"/models/md-{i:05d}",
                    "npusPerReplica": 1,
                },
            }
        )
        node = node_ids[i % len(node_ids)]
        assignment = Assignment(
            deployment=md.key,
            slot="0",
            node_id=node,
            npus=frozenset({(i // len(node_ids)) % 8}),
            kept=False,
        )
        sim.create_service(render_service(md, assignment), running=True)


def measure(nodes: int, deployments: int, rounds: int) -> dict[str, float]:
    """Best CPU and wall time of ``rounds`` observes, and MiB read in one, per list."""
    with EngineSim(nodes=nodes, task_delay=0).start() as sim:
        seed(sim, deployments)
        swarm = Swarm(base_url=sim.url)
        swarm.observe()  # connect and warm the server's caches
        cpu, wall = [], []
        for _ in range(rounds):
            sim.reset_counters()
            started_cpu, started = time.thread_time(), time.perf_counter()
            snapshot = swarm.observe()
            cpu.append(time.thread_time() - started_cpu)
            wall.append(time.perf_counter() - started)
        assert len(snapshot.services) == deployments and len(snapshot.nodes) == nodes
        received = sim.stats()["bytes"]
    return {
        "cpu_s": min(cpu),
        "wall_s": min(wall),
        "mib": sum(received.values()) / 2**20,
        **{route.split("/")[-1]: n / 2**20 for route, n in received.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        default="50x100,250x500",
        help="comma-separated NODESxDEPLOYMENTS (section 8: 1000x2000)",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--report", type=Path, default=None, help="also write the figures into this page"
    )
    args = parser.parse_args(argv)
    lines = [
        f"machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; best of {args.rounds}"
    ]
    print(lines[0], flush=True)
    for size in args.sizes.split(","):
        nodes, deployments = (int(x) for x in size.lower().split("x"))
        r = measure(nodes, deployments, args.rounds)
        lines.append(
            f"{nodes:>5} nodes, {deployments:>5} services: observe "
            f"{r['cpu_s'] * 1000:7.1f} ms CPU ({r['wall_s'] * 1000:7.1f} ms wall), "
            f"{r['mib']:6.2f} MiB of Engine JSON "
            f"(nodes {r['nodes']:.2f}, services {r['services']:.2f}, tasks {r['tasks']:.2f})"
        )
        print(lines[-1], flush=True)
    if args.report is not None:
        replace_block(args.report, "observe", "```\n" + "\n".join(lines) + "\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
