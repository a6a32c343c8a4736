"""The operator's own loops on the lab: runtime.Runtime with its pass loop and background
threads (events, task poll, node-check) against the lab's manager; only the Kubernetes side
is an in-memory recorder (statuses and Events). A node without the runtime is reported and
skipped, then used once fixed, with no test code stepping anything."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

import swarmlab
from npuswarm import metrics
from npuswarm.reconcile import Reconciler
from npuswarm.runtime import Leadership, Runtime
from npuswarm.settings import Settings
from npuswarm.swarm import Swarm
from tests.helpers import sample, wait_for
from tests.invariants import npu_conflicts

from .conftest import ROOT_KEY
from .test_node_agent import body

pytestmark = pytest.mark.lab


class RecordingKube:
    """What the runtime writes to Kubernetes, kept in memory; its LISTs name nothing beyond
    what the test puts in kopf's index."""

    def __init__(self) -> None:
        self.statuses: dict[str, dict[str, Any]] = {}
        self.events: list[tuple[str, str, str]] = []

    def listed(self, plural: str, scopes: set[str] | None = None, operation: str = "") -> set[str]:
        return set()

    def quota_namespaces(self) -> set[str]:
        return set()  # no Namespace carries an NPU quota here

    def patch_status(
        self, namespace: str, name: str, patch: dict[str, Any], plural: str = ""
    ) -> bool:
        self.statuses[f"{namespace}/{name}"] = patch
        return True

    def post_event(self, reference: dict[str, str], type_: str, reason: str, message: str) -> None:
        self.events.append((reference["name"], reason, message))


def entry(name: str) -> dict[str, Any]:
    """kopf's index entry of a 3-replica deployment that needs every NPU of 3 nodes."""
    return {**body(name, replicas=3), "status": {}}


class Operator:
    """Runtime in an event loop of its own thread, as kopf would run it."""

    def __init__(self, lab: swarmlab.Lab, index: dict[Any, Any], agent_image: str) -> None:
        self.settings = Settings(
            root_key=ROOT_KEY,
            agent_image=agent_image,
            resync_seconds=600,
            task_poll_seconds=1,
            node_recheck_failed_seconds=1,
            npu_health_seconds=1,
        )
        self.kube = RecordingKube()
        self.index = index
        self.lab = lab
        self.runtime: Runtime | None = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        swarm = Swarm(base_url=self.lab.endpoint)
        runtime = Runtime(
            settings=self.settings,
            reconciler=Reconciler(swarm, self.settings),
            kube=self.kube,  # type: ignore[arg-type]
            leadership=Leadership(True, False, "default", 0, "lab", None),
            index=self.index,
            loop=asyncio.get_running_loop(),
        )
        self.runtime = runtime
        runtime.start()
        self.ready.set()
        while not runtime.triggers.stop.is_set():
            await asyncio.sleep(0.2)
        for task in runtime.tasks:
            task.cancel()
        await asyncio.gather(*runtime.tasks, return_exceptions=True)

    def __enter__(self) -> Operator:
        self.thread.start()
        self.ready.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        runtime = self.runtime
        assert runtime is not None
        runtime.stop()
        self.thread.join(30)
        for thread in runtime.threads:
            thread.join(30)
        if runtime.node_checks is not None:
            runtime.node_checks.checker.close()
        runtime.reconciler.finalize("lab", "operated", "uid-operated")
        runtime.reconciler.close()


@pytest.mark.usefixtures("agents_removed")
def test_the_operator_skips_a_node_without_the_runtime_and_uses_it_once_fixed(
    swarm_lab: swarmlab.Lab, operator_image: str
) -> None:
    broken_id, broken_host = swarm_lab.node_id(3), swarm_lab.node(3).hostname
    swarm_lab.set_runtime_installed(3, False)
    errors_before = sample(metrics.REGISTRY, "npuswarm_background_errors_total", loop="node-check")
    api = swarm_lab.client(1).api
    try:
        with Operator(swarm_lab, {("lab", "operated"): [entry("operated")]}, operator_image) as operator:
            started = time.monotonic()

            def reported() -> dict[str, Any] | None:
                status = operator.kube.statuses.get("lab/operated") or {}
                degraded = next(
                    (c for c in status.get("conditions", []) if c["type"] == "Degraded"), {}
                )
                wanted = f"Ascend Docker Runtime is not the default runtime on node {broken_host}"
                # The other two nodes' agents may answer after the broken one's: placed on both.
                named = wanted in degraded.get("message", "")
                return status if named and status.get("placedReplicas") == 2 else None

            status = wait_for(
                reported, "the status to name the node, and both replicas placed", 60, 0.3
            )
            reported_after = time.monotonic() - started
            assert broken_id not in {r.get("nodeId") for r in status["replicaStatuses"]}
            assert any(
                reason == "NodeValidationFailed" and broken_host in message
                for _, reason, message in operator.kube.events
            )
            assert not npu_conflicts(api)

            swarm_lab.set_runtime_installed(3, True)
            fixed = time.monotonic()

            def placed_on_fixed() -> bool:
                status = operator.kube.statuses.get("lab/operated") or {}
                return broken_id in {r.get("nodeId") for r in status.get("replicaStatuses", [])}

            wait_for(placed_on_fixed, f"a replica on {broken_host} once fixed", 60, 0.3)
            used_after = time.monotonic() - fixed
            assert not npu_conflicts(api)
            print(
                f"operator: node reported {reported_after:.1f}s after start; "
                f"fixed node used {used_after:.1f}s after the fix"
            )
    finally:
        swarm_lab.set_runtime_installed(3, True)
    assert (
        sample(metrics.REGISTRY, "npuswarm_background_errors_total", loop="node-check")
        == errors_before
    )
