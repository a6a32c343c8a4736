"""The stop grace period on a real Swarm: every replica's service gets it, and a service that
lacks it (written by an npuswarm from before) is not rewritten for it alone: the grace rides
on the replica's next update, so an upgrade restarts no loaded model."""

from __future__ import annotations

import copy

import docker

from npuswarm.reconcile import Reconciler
from npuswarm.swarm import Swarm

from .conftest import STOP_GRACE_SECONDS, converge, model, serve, wait_for

GRACE_NS = int(STOP_GRACE_SECONDS * 1_000_000_000)


def only_service(client: docker.APIClient, namespace: str) -> dict:
    (service,) = client.services(filters={"label": f"npuswarm.io/owner-namespace={namespace}"})
    return service


def test_the_grace_period_rides_on_the_next_update(
    docker_client: docker.APIClient, namespace: str, reconciler: Reconciler
) -> None:
    md = model(namespace, "graceful", replicas=1)
    converge(reconciler, md)
    created = only_service(docker_client, namespace)
    assert created["Spec"]["TaskTemplate"]["ContainerSpec"]["StopGracePeriod"] == GRACE_NS

    # As an npuswarm from before the setting existed left it: no grace period.
    older = copy.deepcopy(created["Spec"])
    del older["TaskTemplate"]["ContainerSpec"]["StopGracePeriod"]
    Swarm().update_service(created["ID"], created["Version"]["Index"], older)

    def settled() -> dict | None:
        # Swarm writes the rolling update's start and end into the service (versions of its
        # own): compare versions only after the end. No UpdateStatus yet means the update has
        # not started (the clean-clone CI once compared then, and Swarm's write followed).
        service = only_service(docker_client, namespace)
        state = (service.get("UpdateStatus") or {}).get("State")
        return service if state == "completed" else None

    stripped = wait_for(settled, "the update of the older spec to complete", timeout=60)
    assert "StopGracePeriod" not in stripped["Spec"]["TaskTemplate"]["ContainerSpec"]

    # The upgraded operator's pass: nothing to write for the grace period alone.
    again = serve(reconciler, md, [md], {})
    assert again.applied == []
    assert only_service(docker_client, namespace)["Version"]["Index"] == stripped["Version"]["Index"]

    # The next change of the replica for another reason carries it.
    edited = model(namespace, "graceful", replicas=1, engine={"env": {"EDITED": "1"}})
    converge(reconciler, edited)
    updated = only_service(docker_client, namespace)
    assert updated["Version"]["Index"] > stripped["Version"]["Index"]
    assert updated["Spec"]["TaskTemplate"]["ContainerSpec"]["StopGracePeriod"] == GRACE_NS
