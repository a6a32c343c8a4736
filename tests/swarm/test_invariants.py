"""The invariant checker of the chaos tests finds what it is meant to find, on a real Swarm:
a checker that never reports would let every chaos run pass."""

from __future__ import annotations

from typing import Any

import docker

from tests import invariants
from tests.helpers import IMAGE, wait_for


def service(client: docker.APIClient, namespace: str, name: str, labels: dict[str, str],
            npus: str) -> dict[str, Any]:
    spec = {"ContainerSpec": {"Image": IMAGE, "Command": ["sleep", "3600"],
                              "Env": [f"ASCEND_VISIBLE_DEVICES={npus}"]}}
    return client.create_service(spec, name=f"{namespace}-{name}",  # type: ignore[no-any-return]
                                 labels={"npuswarm.io/owner-namespace": namespace, **labels})


def test_checker_reports_shared_npus_orphans_duplicates_status_and_foreign_edits(
    docker_client: docker.APIClient, namespace: str
) -> None:
    instance = f"inv-{namespace}"
    owned = {"npuswarm.io/managed-by": "npuswarm", "npuswarm.io/instance": instance,
             "npuswarm.io/owner-name": "m", "npuswarm.io/owner-uid": "uid-1",
             "npuswarm.io/replica": "0", "npuswarm.io/npus": "6"}
    service(docker_client, namespace, "m-0", owned, "6")
    service(docker_client, namespace, "m-0-again", owned, "6")  # same replica, same NPU
    service(docker_client, namespace, "ghost-0", owned | {"npuswarm.io/owner-name": "ghost"}, "5")
    foreign = service(docker_client, namespace, "foreign-0", {}, "4")
    before = invariants.foreign_snapshot(docker_client, instance,
                                         label=f"npuswarm.io/owner-namespace={namespace}")
    assert set(before) == {foreign["ID"]}
    inspected = docker_client.inspect_service(foreign["ID"])
    docker_client.update_service(foreign["ID"], version=inspected["Version"]["Index"],
                                 task_template=inspected["Spec"]["TaskTemplate"],
                                 name=inspected["Spec"]["Name"], labels={"npuswarm.io/owner-namespace": namespace, "edited": "yes"})
    md = {"metadata": {"namespace": namespace, "name": "m", "uid": "uid-2", "generation": 1},
          "status": {"observedGeneration": 1, "placedReplicas": 1, "npus": 1}}

    def all_found() -> list[str] | None:
        found = invariants.violations(docker_client, lambda: [md], instance, foreign_before=before)
        # Only this test's services, so the conflict it makes is not seen by others' checks.
        found += invariants.npu_conflicts(docker_client, label=f"npuswarm.io/owner-namespace={namespace}")
        return found if any("held by 2 tasks" in f for f in found) else None

    found = "\n".join(wait_for(all_found, "both tasks of NPU 6 running", timeout=60))
    assert "NPU 6 on node" in found and f"{namespace}-m-0" in found
    assert f"service {namespace}-ghost-0 belongs to no ModelDeployment" in found
    assert f"two services for {namespace}/m/0" in found
    assert "owner uid uid-1 is not" in found
    assert "status.placedReplicas=1 but Swarm has 2 services" in found
    assert f"foreign service {namespace}-foreign-0" in found and "was changed" in found
    # A re-created owner keeps the old uid label on adopted services: not a violation then.
    recreated = invariants.ownership(docker_client, [md], instance, recreated={(namespace, "m")})
    assert not any("owner uid" in f for f in recreated)
