"""Fault grades on the lab, through the real node agent reading the lab's npu-smi (which
prints error codes as the real one does: `npu-smi info -t health -i N -c 0`): a fault code
graded RestartRequest restarts the replica in place (same node, same NPUs, a new task)
exactly once while the fault lasts, and nothing moves. The invariant checker runs on every
turn (Loops of test_node_agent.py)."""

from __future__ import annotations

from typing import Any

import pytest

import swarmlab
from npuswarm.settings import Settings
from tests.helpers import wait_for

from .conftest import agent_settings
from .test_node_agent import Loops, model

pytestmark = pytest.mark.lab

RESTART_REQUEST = 0x80C98008  # RestartRequest in the default table (docs/node-health.md)


@pytest.fixture
def settings(operator_image: str) -> Settings:
    # A long grace: an isolating grade would move the replica only after it, so a move seen
    # here could only be a restart-graded fault mishandled.
    return agent_settings(operator_image, 600.0)


def tasks_of(lab: swarmlab.Lab, service: str) -> list[dict[str, Any]]:
    return lab.client(1).api.tasks(filters={"service": service})


def force_update(lab: swarmlab.Lab, service: str) -> int:
    spec = lab.client(1).api.inspect_service(service)["Spec"]
    return int(spec["TaskTemplate"].get("ForceUpdate") or 0)


@pytest.mark.usefixtures("agents_removed")
def test_a_restart_graded_fault_restarts_the_replica_in_place_exactly_once(
    swarm_lab: swarmlab.Lab, settings: Settings
) -> None:
    index_of = {swarm_lab.node_id(k): k for k in (1, 2, 3)}
    loops = Loops(swarm_lab, settings, model("restarted", replicas=1, npus=8))
    try:
        def ready() -> bool:
            result = loops.turn()
            return result.views[loops.md.key].status.readyReplicas == 1

        wait_for(ready, "the replica ready", timeout=120, interval=0.5)
        (slot, (node_id, npus)), = loops.replicas().items()
        assert loops.last is not None
        (service,) = [s.name for s in loops.last.plan.snapshot.services_of(loops.md.key)]
        first = {t["ID"] for t in tasks_of(swarm_lab, service)}
        assert force_update(swarm_lab, service) == 0

        swarm_lab.set_npu_state(
            index_of[node_id],
            {min(npus): {"health": "Alarm", "error_codes": [RESTART_REQUEST],
                         "error_information": ["stand-in: request must be re-executed"]}},
        )

        def restarted() -> bool:
            loops.turn()
            return force_update(swarm_lab, service) == 1

        wait_for(restarted, "the replica restarted in place", timeout=60, interval=0.5)
        applied = [a.reason for a in loops.last.views[loops.md.key].applied]  # type: ignore[union-attr]
        wait_for(ready, "the restarted replica ready again", timeout=120, interval=0.5)
        assert loops.replicas() == {slot: (node_id, npus)}, "same node, same NPUs"
        second = {t["ID"] for t in tasks_of(swarm_lab, service)} - first
        assert len(second) == 1, f"one new task: {second}"
        new_task = swarm_lab.client(1).api.inspect_task(second.pop())
        assert new_task["NodeID"] == node_id and new_task["Status"]["State"] == "running"

        # The fault lasts several more readings of the agent: no second restart.
        reads_before = loops.checker.readings()[node_id].read_at

        def several_reads() -> bool:
            loops.turn()
            reading = loops.checker.readings()[node_id]
            return (reading.read_at - reads_before).total_seconds() >= 5

        wait_for(several_reads, "five more seconds of readings", timeout=60, interval=0.5)
        fault = loops.checker.readings()[node_id].npus[min(npus)].fault
        assert fault is not None and fault.level == "RestartRequest", fault
        assert force_update(swarm_lab, service) == 1
        assert len({t["ID"] for t in tasks_of(swarm_lab, service)}) == len(first) + 1
        assert loops.replicas() == {slot: (node_id, npus)}
        print(f"restarted in place: {applied}")
    finally:
        for k in (1, 2, 3):
            swarm_lab.set_npu_state(k, {})
        loops.close()
