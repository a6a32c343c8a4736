"""Node validation on the multi-node lab: a node whose Ascend runtime is not installed never
gets a replica, is reported (status, Event, metric, `npuswarm nodes --validate`) and is used
once fixed. The pass and the checker run here as the operator's loops run them."""

from __future__ import annotations

import io
import time
from contextlib import redirect_stdout
from typing import Any

import pytest
from prometheus_client import generate_latest

import swarmlab
from npuswarm import cli, metrics
from npuswarm.nodehealth import checks as node_checks, npusmi
from npuswarm.api.deployment import ModelDeployment
from npuswarm.nodehealth.runner import NodeChecker, publish_verdicts
from npuswarm.reconcile import PassResult, Reconciler
from npuswarm.core.pipeline import Desired
from npuswarm.settings import Settings
from npuswarm.swarm import Swarm
from tests.helpers import wait_for
from tests.invariants import npu_conflicts

pytestmark = pytest.mark.lab

SETTINGS = Settings(node_recheck_failed_seconds=1.0, node_probe_timeout_seconds=60.0)


def body(name: str, replicas: int) -> dict[str, Any]:
    """A deployment of `replicas` x 8 NPUs, as kubectl would send it."""
    return {
        "metadata": {
            "name": name,
            "namespace": "lab",
            "uid": f"uid-{name}",
            "generation": 1,
            "creationTimestamp": "2026-12-01T00:00:00Z",
        },
        "spec": {
            "image": swarmlab.IMAGE,
            "model": f"/models/{name}",
            "mode": "Replicated",
            "replicas": replicas,
            "npusPerReplica": 8,
            "healthCheck": {"startPeriodSeconds": 20, "intervalSeconds": 1, "timeoutSeconds": 2},
            "restartPolicy": {"delaySeconds": 1},
        },
    }


def model(name: str, replicas: int) -> ModelDeployment:
    return ModelDeployment.model_validate(body(name, replicas))


class Loops:
    """The operator's pass and node-check loops, stepped by the test."""

    def __init__(self, lab: swarmlab.Lab, md: ModelDeployment) -> None:
        self.swarm = Swarm(base_url=lab.endpoint)
        self.reconciler = Reconciler(self.swarm, SETTINGS)
        self.checker = NodeChecker(
            self.swarm, SETTINGS, self.reconciler.lock, lambda: self.reconciler.last_plan
        )
        self.md = md
        self.previous: dict[str, Any] = {}
        self.last: PassResult | None = None

    def turn(self) -> PassResult:
        self.checker.step([(self.md.spec.nodeSelector, self.md.spec.image)])
        result = self.reconciler.run_pass(
            Desired(deployments=[self.md], previous={self.md.key: self.previous}),
            self.checker.unusable,
        )
        self.previous = result.views[self.md.key].status.model_dump(mode="json")
        self.last = result
        return result

    def nodes_of_replicas(self) -> dict[str, str]:
        return (
            {
                s.slot: s.labels["npuswarm.io/node"]
                for s in self.last.plan.snapshot.services_of(self.md.key)
            }
            if self.last
            else {}
        )

    def close(self) -> None:
        self.checker.close()
        self.reconciler.finalize(
            self.md.metadata.namespace, self.md.metadata.name, self.md.metadata.uid
        )
        self.reconciler.close()


def probes_left(lab: swarmlab.Lab) -> list[str]:
    api = lab.client(1).api
    return [
        s["Spec"]["Name"]
        for key in (node_checks.CHECK, npusmi.READING)
        for s in api.services(filters={"label": key})
    ]


def test_a_node_without_the_runtime_gets_no_replica_is_reported_and_is_used_once_fixed(
    swarm_lab: swarmlab.Lab,
) -> None:
    broken = 3
    broken_id, broken_host = swarm_lab.node_id(broken), swarm_lab.node(broken).hostname
    swarm_lab.set_runtime_installed(broken, False)
    loops = Loops(swarm_lab, model("validated", replicas=3))
    publish_verdicts(loops.checker)
    try:
        started = time.monotonic()

        def all_judged() -> bool:
            loops.turn()
            assert not npu_conflicts(swarm_lab.client(1).api), npu_conflicts(
                swarm_lab.client(1).api
            )
            return len(loops.checker.verdicts()) == 3

        wait_for(all_judged, "a verdict for every node", timeout=90, interval=0.5)
        judged_after = time.monotonic() - started
        verdicts = loops.checker.verdicts()
        assert not verdicts[broken_id].ok
        assert all(v.ok for k, v in verdicts.items() if k != broken_id), verdicts

        result = loops.turn()
        placed = loops.nodes_of_replicas()
        assert broken_id not in placed.values(), placed
        assert len(placed) == 2
        status = result.views[loops.md.key].status
        degraded = next(c for c in status.conditions if c.type == "Degraded")
        wanted = f"Ascend Docker Runtime is not the default runtime on node {broken_host}"
        assert degraded.reason == "NodeValidationFailed" and wanted in degraded.message, degraded
        events = [
            e for e in result.views[loops.md.key].events if e.reason == "NodeValidationFailed"
        ]
        assert events and wanted in events[0].message
        scraped = generate_latest(metrics.REGISTRY).decode()
        assert f'npuswarm_node_validation{{check="runtime",node="{broken_host}"}} 0.0' in scraped

        # `npuswarm nodes --validate` says the same (the other nodes' NPUs are all in use).
        out = io.StringIO()
        with pytest.MonkeyPatch.context() as patch, redirect_stdout(out):
            patch.setenv("DOCKER_HOST", swarm_lab.endpoint)
            code = cli.main(
                ["nodes", "--validate", "--probe-image", swarmlab.IMAGE, "--timeout", "60"]
            )
        assert code == 1 and wanted in out.getvalue(), out.getvalue()

        # Fixed: the next re-check passes and the third replica goes there.
        swarm_lab.set_runtime_installed(broken, True)
        fixed = time.monotonic()

        def placed_on_fixed_node() -> bool:
            loops.turn()
            return broken_id in loops.nodes_of_replicas().values()

        wait_for(
            placed_on_fixed_node, f"a replica on {broken_host} once fixed", timeout=60, interval=0.5
        )
        used_after = time.monotonic() - fixed
        assert not npu_conflicts(swarm_lab.client(1).api)
        print(
            f"verdicts for 3 nodes in {judged_after:.1f}s; fixed node used after {used_after:.1f}s"
        )
    finally:
        swarm_lab.set_runtime_installed(broken, True)
        loops.close()
        publish_verdicts(None)
    wait_for(lambda: not probes_left(swarm_lab), "no probe service left", timeout=30)
