"""The one-pass operator reacting to Swarm, with a resync far beyond every deadline here
(NPUSWARM_RESYNC_SECONDS=600 in conftest): each reaction must come from a trigger."""

from __future__ import annotations

import pytest

from tests.swarm.conftest import IMAGE, wait_for

from .conftest import INSTANCE, Cluster, is_ready, manifest, wait_md

pytestmark = pytest.mark.e2e


def services(cluster: Cluster, namespace: str) -> dict[str, dict]:
    found = cluster.docker.services(filters={"label": f"npuswarm.io/owner-namespace={namespace}"})
    return {s["Spec"]["Name"]: s for s in found}


def test_a_service_removed_by_hand_comes_back_from_swarms_event(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=manifest("evented"))
    wait_md(cluster, namespace, "evented", is_ready, "Ready")
    name = f"{namespace}-evented-0"
    cluster.docker.remove_service(services(cluster, namespace)[name]["ID"])
    wait_for(lambda: name in services(cluster, namespace), "the service to be re-created", timeout=30)
    wait_md(cluster, namespace, "evented", is_ready, "Ready again")


def test_a_service_whose_owner_is_gone_is_removed_and_a_foreign_one_is_not(
    cluster: Cluster, namespace: str
) -> None:
    template = {"ContainerSpec": {"Image": IMAGE, "Command": ["sleep", "3600"]}}
    owned = {
        "npuswarm.io/managed-by": "npuswarm",
        "npuswarm.io/instance": INSTANCE,
        "npuswarm.io/owner-namespace": namespace,
        "npuswarm.io/owner-name": "never-applied",
        "npuswarm.io/owner-uid": "uid-of-something-deleted",
        "npuswarm.io/replica": "0",
        "npuswarm.io/node": cluster.docker.info()["Swarm"]["NodeID"],
        "npuswarm.io/npus": "7",
    }
    orphan = cluster.docker.create_service(template, name=f"{namespace}-never-applied-0", labels=owned)
    # Another installation's service, and a hand-made one: neither is this operator's to judge.
    other = cluster.docker.create_service(
        template, name=f"{namespace}-other-0", labels=owned | {"npuswarm.io/instance": "someone-else"}
    )
    hand = cluster.docker.create_service(
        template, name=f"{namespace}-hand-0", labels={"npuswarm.io/owner-namespace": namespace}
    )
    try:
        wait_for(lambda: f"{namespace}-never-applied-0" not in services(cluster, namespace),
                 "the orphan to be removed", timeout=30)
        left = services(cluster, namespace)
        assert {f"{namespace}-other-0", f"{namespace}-hand-0"} <= set(left)
        assert orphan["ID"] not in {s["ID"] for s in left.values()}
    finally:
        for service in (other, hand):
            cluster.docker.remove_service(service["ID"])


def test_a_rolling_update_advances_without_waiting_for_the_resync(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=manifest("rolling", replicas=3))
    wait_md(cluster, namespace, "rolling", is_ready, "Ready")
    edited = manifest("rolling", replicas=3, engine={"port": 8000, "env": {"VERSION": "2"}})
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=edited)

    def rolled() -> bool:
        found = services(cluster, namespace).values()
        envs = [s["Spec"]["TaskTemplate"]["ContainerSpec"].get("Env", []) for s in found]
        return len(envs) == 3 and all("VERSION=2" in env for env in envs)

    # maxUnavailable 1: three steps, each started by the previous replica becoming ready.
    wait_for(rolled, "all three replicas to run the new spec", timeout=120)
    wait_md(cluster, namespace, "rolling", is_ready, "Ready after the rollout")
