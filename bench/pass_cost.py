#!/usr/bin/env python3
"""CPU, list calls and writes of one reconcile pass: python bench/pass_cost.py

The real Reconciler, with the real docker-py client talking HTTP to the synthetic Engine
(bench/enginesim.py, in this process). For each size it runs the first pass (every service
created), then times a no-op pass in CPU seconds of the calling thread (the server's threads
do not count; a no-op pass makes no write, so all of its work is on that thread: the four
list calls, JSON decoding, the snapshot, placement, render, diff and every status), then
changes k deployments and counts the writes of the next pass.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import structlog  # noqa: E402
from enginesim import EngineSim  # noqa: E402
from fleet import replace_block  # noqa: E402

from npuswarm.api.deployment import ModelDeployment  # noqa: E402
from npuswarm.reconcile import Reconciler  # noqa: E402
from npuswarm.core.pipeline import Desired  # noqa: E402
from npuswarm.settings import Settings  # noqa: E402
from npuswarm.swarm import Swarm  # noqa: E402


def deployment(index: int, env: dict[str, str] | None = None) -> ModelDeployment:
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(1_700_000_000 + index))
    return ModelDeployment.model_validate(
        {
            "metadata": {
                "name": f"md-{index:05d}",
                "namespace": "fleet",
                "uid": f"uid-{index}",
                "generation": 1,
                "creationTimestamp": created,
            },
            "spec": {
                "image": "sim/vllm:bench",
                "model": f"/models/md-{index:05d}",
                "npusPerReplica": 1,
                "engine": {"env": env or {}},
            },
        }
    )


def measure(nodes: int, deployments: int, rounds: int, changed: int) -> dict[str, float]:
    with EngineSim(nodes=nodes, task_delay=0).start() as sim:
        reconciler = Reconciler(Swarm(base_url=sim.url), Settings())
        everyone = [deployment(i) for i in range(deployments)]
        first = reconciler.run_pass(Desired(deployments=everyone))
        assert first.writes == deployments, first.writes
        cpu, wall, lists, writes = [], [], [], []
        for _ in range(rounds):
            sim.reset_counters()
            started_cpu, started = time.thread_time(), time.perf_counter()
            result = reconciler.run_pass(Desired(deployments=everyone))
            cpu.append(time.thread_time() - started_cpu)
            wall.append(time.perf_counter() - started)
            stats = sim.stats()
            lists.append(stats["list_calls"])
            writes.append(stats["writes"])
        assert all(v.status.phase == "Ready" for v in result.views.values())
        k = min(changed, deployments)
        edited = [deployment(i, {"BENCH": "2"}) if i < k else md for i, md in enumerate(everyone)]
        sim.reset_counters()
        after = reconciler.run_pass(Desired(deployments=edited))
        reconciler.close()
        return {
            "cpu_s": min(cpu),
            "wall_s": min(wall),
            "list_calls": max(lists),
            "noop_writes": max(writes),
            "k": k,
            "k_writes": sim.stats()["writes"],
            "k_result_writes": after.writes,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        default="1000x1,1000x10,1000x100,1000x1000,1000x2000",
        help="comma-separated NODESxDEPLOYMENTS",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--changed", type=int, default=10, help="k deployments edited")
    parser.add_argument("--report", type=Path, default=None, help="write the table into this page")
    args = parser.parse_args(argv)
    # Thousands of "service written" lines would measure the terminal, not the pass.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    lines = [
        f"machine: {cpu_model}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"best of {args.rounds} no-op passes",
        "",
        "| nodes | deployments | no-op pass CPU | wall | list calls per pass | writes (no-op) "
        "| k changed | writes |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    print(lines[0], flush=True)
    for size in args.sizes.split(","):
        nodes, deployments = (int(x) for x in size.lower().split("x"))
        r = measure(nodes, deployments, args.rounds, args.changed)
        lines.append(
            f"| {nodes} | {deployments} | {r['cpu_s'] * 1000:.0f} ms | {r['wall_s'] * 1000:.0f} ms "
            f"| {r['list_calls']:.0f} | {r['noop_writes']:.0f} | {r['k']:.0f} "
            f"| {r['k_writes']:.0f} |"
        )
        print(lines[-1], flush=True)
    if args.report is not None:
        replace_block(args.report, "pass", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
