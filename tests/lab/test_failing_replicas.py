"""Failing replicas on the multi-node lab (docs/node-health.md, "Failing replicas"): a replica
whose node makes it crash moves to another node after the threshold."""

from __future__ import annotations

import time

import pytest

import swarmlab
from npuswarm.settings import Settings
from tests.helpers import wait_for
from tests.invariants import npu_conflicts

from .test_node_agent import model

pytestmark = pytest.mark.lab


def test_a_replica_crashing_on_one_node_only_ends_up_running_on_another(
    swarm_lab: swarmlab.Lab,
) -> None:
    from npuswarm.core.relocation import FailureTracker
    from npuswarm.reconcile import Reconciler
    from npuswarm.core.pipeline import Desired
    from npuswarm.swarm import Swarm

    settings = Settings(failing_replica_threshold=2, failing_replica_backoff_seconds=5)
    reconciler = Reconciler(Swarm(base_url=swarm_lab.endpoint), settings)
    tracker = FailureTracker(settings.relocation_rules(), reconciler.clock)
    md = model("crashy", replicas=1)
    api = swarm_lab.client(1).api
    first = swarm_lab.node_id(1)
    # node1 sorts first, so the replica goes there; there its containers get no NPUs and the
    # fake vLLM exits at once, on every restart (validation is off in this test).
    swarm_lab.set_runtime_installed(1, False)
    previous: dict = {}
    # Replicas of earlier tests still stopping hold NPUs (their stop grace), so node1 would not
    # be the emptiest node yet: wait for them to exit.
    wait_for(lambda: not reconciler.swarm.observe().stopping, "earlier replicas to have stopped", 150, 0.5)
    try:
        started = time.monotonic()

        def running_elsewhere() -> str | None:
            nonlocal previous
            result = reconciler.run_pass(
                Desired(deployments=[md], previous={md.key: previous}), tracker.checks(None)
            )
            previous = result.views[md.key].status.model_dump(mode="json")
            assert not npu_conflicts(api), npu_conflicts(api)
            replica = result.views[md.key].status.replicaStatuses[0]
            if replica.nodeId and replica.nodeId != first and replica.taskState == "running":
                return replica.nodeId
            return None

        node = wait_for(running_elsewhere, "the crashing replica running on another node", 120, 0.5)
        took = time.monotonic() - started
        history = tracker.histories[(md.key, "0")]
        assert history.moves == 1 and first in history.avoid
        assert node != first
        print(f"crashing replica running on another node {took:.1f}s after it was created")
    finally:
        swarm_lab.set_runtime_installed(1, True)
        reconciler.finalize(md.metadata.namespace, md.metadata.name, md.metadata.uid)
        reconciler.close()
