"""Which replica a scale-down stops, on a real Swarm (core/scaledown.py): with every replica
ready, the one whose task started last goes, not the last slot. Here slot 0's container is
killed, Swarm starts a new task for it, and the scale-down from 3 to 2 removes slot 0."""

from __future__ import annotations

import docker

from npuswarm.reconcile import Reconciler

from .conftest import converge, model, wait_for


def slots(client: docker.APIClient, namespace: str) -> dict[str, dict]:
    return {s["Spec"]["Labels"]["npuswarm.io/replica"]: s
            for s in client.services(filters={"label": f"npuswarm.io/owner-namespace={namespace}"})}


def test_the_replica_that_started_last_is_stopped_first(
    docker_client: docker.APIClient, namespace: str, reconciler: Reconciler
) -> None:
    three = model(namespace, "chooser", replicas=3)
    converge(reconciler, three)
    services = slots(docker_client, namespace)
    assert sorted(services) == ["0", "1", "2"]
    name = services["0"]["Spec"]["Name"]
    (container,) = docker_client.containers(filters={"label": f"com.docker.swarm.service.name={name}"})
    docker_client.kill(container["Id"])

    def restarted() -> bool:
        tasks = docker_client.tasks(filters={"service": name, "desired-state": "running"})
        return any(t["Status"]["State"] == "running" and t["ID"] != container["Labels"].get(
            "com.docker.swarm.task.id") for t in tasks)

    wait_for(restarted, "Swarm running a new task for slot 0", timeout=60)
    converge(reconciler, three)  # all three ready again: slot 0's task is the newest

    converge(reconciler, model(namespace, "chooser", replicas=2))
    assert sorted(slots(docker_client, namespace)) == ["1", "2"]
