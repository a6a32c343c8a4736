"""The autoscaler's watch of a replica woken from zero (runtime/autoscaler.py): one service's
tasks, read by its name on a real Swarm, and a name Swarm no longer knows read as no task."""

from __future__ import annotations

import docker

from npuswarm.reconcile import Reconciler
from npuswarm.swarm import Swarm

from .conftest import converge, model, wait_for


def test_one_services_task_states_are_read_by_its_name(
    docker_client: docker.APIClient, namespace: str, reconciler: Reconciler
) -> None:
    converge(reconciler, model(namespace, "woken"))
    (service,) = docker_client.services(filters={"label": f"npuswarm.io/owner-namespace={namespace}"})
    swarm = reconciler.swarm
    assert isinstance(swarm, Swarm)
    name = service["Spec"]["Name"]
    wait_for(lambda: swarm.task_states_of(name) == ["running"], "its one task running", timeout=60)
    docker_client.remove_service(service["ID"])
    assert swarm.task_states_of(name) == []
