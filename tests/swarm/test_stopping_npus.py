"""NPUs of a removed service's task that is still stopping (its stop grace period) are not
given out: on the real Swarm, such a task stays listed (desired state "remove", state still
running) until its container exits, and the snapshot counts its NPUs as taken. Preemption
relies on it (docs/priority.md): the preemptor is placed only once its victims have exited."""

from __future__ import annotations

import time
import uuid

import docker

from npuswarm.reconcile import Reconciler
from npuswarm.swarm import Swarm
from tests.helpers import IMAGE

from .conftest import converge, model, serve, wait_for

GRACE_SECONDS = 8


def test_a_stopping_tasks_npus_are_given_out_only_once_it_has_exited(
    docker_client: docker.APIClient, namespace: str, reconciler: Reconciler
) -> None:
    # Another workload on NPUs 6 and 7 that ignores SIGTERM: it stops only at SIGKILL, after
    # its grace period.
    spec = docker.types.ContainerSpec(
        IMAGE, command=["sh", "-c", "trap '' TERM; sleep 600"], env=["ASCEND_VISIBLE_DEVICES=6,7"],
        stop_grace_period=GRACE_SECONDS * 1_000_000_000,
    )
    created = docker_client.create_service(
        docker.types.TaskTemplate(spec), name=f"stopping-{uuid.uuid4().hex[:8]}",
        labels={"npuswarm.io/owner-namespace": namespace},
    )
    wait_for(lambda: any(t["Status"]["State"] == "running" for t in docker_client.tasks(
        filters={"service": created["ID"]})), "the other workload running", timeout=60)
    docker_client.remove_service(created["ID"])
    removed_at = time.monotonic()

    snapshot = Swarm().observe()
    (claim,) = [c for c in snapshot.stopping if c.owner == created["ID"]]
    assert claim.npus == frozenset({6, 7})

    pinned = model(namespace, "pinned", npusPerReplica=2, npuIds=[6, 7])
    waited = serve(reconciler, pinned, [pinned], {})
    still_stopping = [t for t in docker_client.tasks(filters={"desired-state": "remove"})
                      if t["ServiceID"] == created["ID"] and t["Status"]["State"] == "running"]
    assert still_stopping, "the task outlived the pass (the grace period is 8 s)"
    assert waited.status.placedReplicas == 0 and waited.applied == []

    view = converge(reconciler, pinned, timeout=60)
    print(f"placed {time.monotonic() - removed_at:.1f}s after the removal (grace {GRACE_SECONDS}s)")
    assert view.status.replicaStatuses[0].npus == [6, 7]
    assert not [t for t in docker_client.tasks() if t["ServiceID"] == created["ID"]
                and t["Status"]["State"] == "running"]
