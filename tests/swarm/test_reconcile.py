"""The core loop against a real Swarm: create, converge, scale, edit, drift, delete, contention."""

from __future__ import annotations

import docker
import pytest

from npuswarm import metrics
from npuswarm.reconcile import Reconciler
from npuswarm.swarm import Swarm, SwarmUnavailable

from tests.helpers import sample

from .conftest import converge, model, serve, swarm_settings, wait_for


def owned(client: docker.APIClient, namespace: str, name: str | None = None) -> dict[str, dict]:
    filters = [f"npuswarm.io/owner-namespace={namespace}"]
    if name:
        filters.append(f"npuswarm.io/owner-name={name}")
    return {s["Spec"]["Name"]: s for s in client.services(filters={"label": filters})}


def env_of(service: dict) -> dict[str, str]:
    pairs = service["Spec"]["TaskTemplate"]["ContainerSpec"]["Env"]
    return dict(p.split("=", 1) for p in pairs)


def writes() -> float:
    return sum(
        sample(metrics.REGISTRY, "npuswarm_swarm_api_calls_total", operation=op, outcome=outcome)
        for op in ("create_service", "update_service", "remove_service")
        for outcome in ("success", "error")
    )


def test_a_dotted_kubernetes_name_gets_a_service_swarm_accepts(
    docker_client: docker.APIClient, namespace: str, reconciler: Reconciler
) -> None:
    """`qwen2.5-7b` stayed Degraded with Swarm's "name must be valid as a DNS name component"
    before names were mapped (issue 25, item 5)."""
    outcome = converge(reconciler, model(namespace, "qwen2.5-7b"))
    assert list(owned(docker_client, namespace)) == [f"{namespace}-qwen2_5-7b-0"]
    assert outcome.status.readyReplicas == 1


def test_create_gives_each_replica_its_own_npus_env_constraint_and_labels(
    docker_client: docker.APIClient, namespace: str, reconciler: Reconciler
) -> None:
    md = model(namespace, "qwen3", replicas=2, engine={"tensorParallelSize": 2})
    outcome = converge(reconciler, md)
    services = owned(docker_client, namespace)
    assert len(services) == 2
    node_id = docker_client.info()["Swarm"]["NodeID"]
    seen: set[str] = set()
    for service in services.values():
        env = env_of(service)
        npus = set(env["ASCEND_VISIBLE_DEVICES"].split(","))
        assert len(npus) == 2 and not npus & seen
        seen |= npus
        assert env["ASCEND_RT_VISIBLE_DEVICES"] == "0,1"
        assert service["Spec"]["TaskTemplate"]["Placement"]["Constraints"] == [f"node.id=={node_id}"]
        labels = service["Spec"]["Labels"]
        assert labels["npuswarm.io/npus"] == env["ASCEND_VISIBLE_DEVICES"]
        assert labels["npuswarm.io/owner-name"] == "qwen3"
        assert labels["npuswarm.io/node"] == node_id
    assert outcome.status.readyReplicas == 2 and outcome.status.npus == 4
    ready = next(c for c in outcome.status.conditions if c.type == "Ready")
    assert ready.status == "True"


def calls(operation: str) -> float:
    return sum(
        sample(metrics.REGISTRY, "npuswarm_swarm_api_calls_total", operation=operation, outcome=outcome)
        for outcome in ("success", "error")
    )


def test_unchanged_deployment_makes_no_write_and_four_list_calls(
    docker_client: docker.APIClient, namespace: str, reconciler: Reconciler
) -> None:
    md = model(namespace, "steady", replicas=3)
    others = [model(namespace, f"other{i}", replicas=1, created=f"2026-01-0{i + 2}T00:00:00Z") for i in range(2)]
    everyone = [md, *others]
    for each in everyone:
        converge(reconciler, each, everyone)
    before = writes()
    lists = ("list_nodes", "list_services", "list_tasks", "list_networks")
    listed = {op: calls(op) for op in lists}
    again = serve(reconciler, md, everyone, {})
    assert again.applied == []
    assert writes() == before
    # One call per kind, however many deployments, replicas and tasks there are.
    assert {op: calls(op) - listed[op] for op in lists} == dict.fromkeys(lists, 1)


def test_scale_down_removes_exactly_the_right_services(
    docker_client: docker.APIClient, namespace: str, reconciler: Reconciler
) -> None:
    converge(reconciler, model(namespace, "m", replicas=3))
    three = owned(docker_client, namespace)
    assert len(three) == 3
    # All ready: the scale-down keeps the replica whose task has run longest, then the lowest
    # slot (core/scaledown.py).
    started = {
        name: min(t["CreatedAt"] for t in docker_client.tasks(filters={"service": service["ID"]}))
        for name, service in three.items()
    }
    oldest = min(started, key=lambda name: (started[name], name))
    converge(reconciler, model(namespace, "m", replicas=1))
    names = sorted(owned(docker_client, namespace))
    assert names == [oldest]


def test_spec_edit_updates_only_the_affected_deployment(
    docker_client: docker.APIClient, namespace: str, reconciler: Reconciler
) -> None:
    a = model(namespace, "a", replicas=1)
    b = model(namespace, "b", replicas=1, created="2026-01-02T00:00:00Z")
    converge(reconciler, a, [a, b])
    converge(reconciler, b, [a, b])
    versions = {n: s["Version"]["Index"] for n, s in owned(docker_client, namespace).items()}
    edited = model(namespace, "a", replicas=1, engine={"env": {"NEW": "1"}})
    converge(reconciler, edited, [edited, b])
    after = owned(docker_client, namespace)
    assert after[f"{namespace}-b-0"]["Version"]["Index"] == versions[f"{namespace}-b-0"]
    assert after[f"{namespace}-a-0"]["Version"]["Index"] > versions[f"{namespace}-a-0"]
    assert env_of(after[f"{namespace}-a-0"])["NEW"] == "1"


def test_service_deleted_by_hand_is_recreated_and_counted_as_drift(
    docker_client: docker.APIClient, namespace: str, reconciler: Reconciler
) -> None:
    md = model(namespace, "m", replicas=1)
    outcome = converge(reconciler, md)
    docker_client.remove_service(f"{namespace}-m-0")
    recreated = sample(metrics.REGISTRY, "npuswarm_drift_corrections_total", kind="service_recreated")
    again = serve(reconciler, md, [md], outcome.status.model_dump(mode="json"))
    assert [(a.kind, a.drift) for a in again.applied] == [("create", "service_recreated")]
    assert f"{namespace}-m-0" in owned(docker_client, namespace)
    assert sample(metrics.REGISTRY, "npuswarm_drift_corrections_total", kind="service_recreated") == recreated + 1


def test_service_edited_by_hand_is_reverted(
    docker_client: docker.APIClient, namespace: str, reconciler: Reconciler
) -> None:
    md = model(namespace, "m", replicas=1)
    outcome = converge(reconciler, md)
    service = owned(docker_client, namespace)[f"{namespace}-m-0"]
    spec = service["Spec"]
    spec["TaskTemplate"]["ContainerSpec"]["Env"].append("ASCEND_VISIBLE_DEVICES_HACK=1")
    docker_client.update_service(service["ID"], service["Version"]["Index"], task_template=spec["TaskTemplate"],
                                 name=spec["Name"], labels=spec["Labels"], mode=spec["Mode"],
                                 endpoint_spec=spec.get("EndpointSpec"))
    again = serve(reconciler, md, [md], outcome.status.model_dump(mode="json"))
    assert [(a.kind, a.drift) for a in again.applied] == [("update", "service_updated")]
    assert "ASCEND_VISIBLE_DEVICES_HACK" not in env_of(owned(docker_client, namespace)[f"{namespace}-m-0"])


def test_delete_removes_every_owned_service_and_nothing_else(
    docker_client: docker.APIClient, namespace: str, reconciler: Reconciler
) -> None:
    converge(reconciler, model(namespace, "gone", replicas=2))
    converge(reconciler, model(namespace, "stays", replicas=1))
    foreign = docker_client.create_service(
        {"ContainerSpec": {"Image": "npuswarm/tiny-vllm:dev", "Command": ["sleep", "3600"]}},
        name=f"{namespace}-gone-9",  # looks like ours by name, but has no npuswarm labels
        labels={"npuswarm.io/owner-namespace": namespace},
    )
    try:
        assert reconciler.finalize(namespace, "gone", f"uid-{namespace}-gone") == 2
        names = set(owned(docker_client, namespace))
        assert f"{namespace}-stays-0" in names and f"{namespace}-gone-9" in names
        assert not any(n.startswith(f"{namespace}-gone-") and n != f"{namespace}-gone-9" for n in names)
    finally:
        docker_client.remove_service(foreign["ID"])


def test_contention_never_double_books_and_the_loser_says_why(
    docker_client: docker.APIClient, namespace: str, reconciler: Reconciler
) -> None:
    first = model(namespace, "first", replicas=1, engine={"tensorParallelSize": 8})
    second = model(namespace, "second", replicas=2, npusPerReplica=4, created="2026-01-02T00:00:00Z")
    everyone = [first, second]
    converge(reconciler, first, everyone)
    outcome = serve(reconciler, second, everyone, {})
    assert outcome.applied == []
    assert outcome.status.phase == "Degraded"
    degraded = next(c for c in outcome.status.conditions if c.type == "Degraded")
    assert degraded.reason == "InsufficientNPUs" and "needs 4 free NPUs" in degraded.message
    claimed: list[str] = []
    for service in owned(docker_client, namespace).values():
        claimed += service["Spec"]["Labels"]["npuswarm.io/npus"].split(",")
    assert sorted(claimed) == [str(i) for i in range(8)]


def test_failing_task_makes_the_deployment_degraded_with_swarms_error(
    docker_client: docker.APIClient, namespace: str, reconciler: Reconciler
) -> None:
    md = model(namespace, "broken", replicas=1, engine={"env": {"FAKE_REQUIRE_NPUS": "1"}})
    status: dict = {}

    def degraded() -> object:
        nonlocal status
        outcome = serve(reconciler, md, [md], status)
        status = outcome.status.model_dump(mode="json")
        condition = next(c for c in outcome.status.conditions if c.type == "Degraded")
        return outcome if condition.reason == "TaskFailed" else None

    outcome = wait_for(degraded, "the failing task to be reported", timeout=60)
    replica = outcome.status.replicaStatuses[0]
    assert replica.lastError == "task: non-zero exit (1)"  # Swarm's text, verbatim
    assert outcome.status.phase == "Degraded" and not replica.ready


def test_unreachable_swarm_raises_and_removes_nothing(
    docker_client: docker.APIClient, namespace: str, tmp_path: pytest.TempPathFactory
) -> None:
    working = Reconciler(Swarm(), swarm_settings())
    md = model(namespace, "kept", replicas=1)
    converge(working, md)
    dead = Reconciler(Swarm(base_url=f"unix://{tmp_path}/no.sock", timeout=2), swarm_settings())
    with pytest.raises(SwarmUnavailable):
        serve(dead, md, [], {})
    with pytest.raises(SwarmUnavailable):
        dead.finalize(namespace, "kept", f"uid-{namespace}-kept")
    assert f"{namespace}-kept-0" in owned(docker_client, namespace)


def test_surge_update_starts_the_new_copy_on_spare_npus_before_the_old_one_goes(
    docker_client: docker.APIClient, namespace: str, reconciler: Reconciler
) -> None:
    strategy = {"maxSurge": 1, "maxUnavailable": 0}
    md = model(namespace, "surge", replicas=1, npusPerReplica=2, updateStrategy=strategy)
    converge(reconciler, md)
    old = owned(docker_client, namespace)[f"{namespace}-surge-0"]
    edited = model(namespace, "surge", replicas=1, npusPerReplica=2, updateStrategy=strategy,
                   engine={"env": {"VERSION": "2"}})
    first = serve(reconciler, edited, [edited], {})
    assert [(a.kind, a.service_name) for a in first.applied] == [("create", f"{namespace}-surge-0-surge")]
    both = owned(docker_client, namespace)
    assert set(both) == {f"{namespace}-surge-0", f"{namespace}-surge-0-surge"}
    new_npus = both[f"{namespace}-surge-0-surge"]["Spec"]["Labels"]["npuswarm.io/npus"]
    assert not set(new_npus.split(",")) & set(old["Spec"]["Labels"]["npuswarm.io/npus"].split(","))
    converge(reconciler, edited)
    remaining = owned(docker_client, namespace)
    assert set(remaining) == {f"{namespace}-surge-0-surge"}
    assert env_of(remaining[f"{namespace}-surge-0-surge"])["VERSION"] == "2"


def test_pinned_npus_are_the_ones_the_service_gets(
    docker_client: docker.APIClient, namespace: str, reconciler: Reconciler
) -> None:
    md = model(namespace, "pinned", replicas=1, npusPerReplica=2, npuIds=[6, 5])
    converge(reconciler, md)
    service = owned(docker_client, namespace)[f"{namespace}-pinned-0"]
    assert env_of(service)["ASCEND_VISIBLE_DEVICES"] == "5,6"
    assert service["Spec"]["Labels"]["npuswarm.io/npus"] == "5,6"


def test_a_stack_service_holding_npus_is_never_given_them_nor_touched(
    docker_client: docker.APIClient, namespace: str, reconciler: Reconciler
) -> None:
    """The new user's case: an old stack-deployed service still holds davinci0-3 on the node."""
    from npuswarm.cli import nodes_map

    hostname = docker_client.info()["Name"]
    stack = docker_client.create_service(
        {
            "ContainerSpec": {
                "Image": "npuswarm/tiny-vllm:dev",
                "Command": ["sleep", "3600"],
                "Env": ["ASCEND_VISIBLE_DEVICES=0-3"],
            },
            "Placement": {"Constraints": [f"node.hostname=={hostname}"]},
        },
        name=f"{namespace}_vllm-qwen3",
        labels={"com.docker.stack.namespace": namespace},
    )
    try:
        view = converge(reconciler, model(namespace, "newcomer", replicas=1, npusPerReplica=4))
        assert not set(view.status.replicaStatuses[0].npus) & {0, 1, 2, 3}
        snapshot = reconciler.swarm.observe()  # type: ignore[attr-defined]
        shown = nodes_map(snapshot)
        assert f"davinci0   foreign: {namespace}_vllm-qwen3" in shown
        versions = docker_client.inspect_service(stack["ID"])["Version"]["Index"]
        serve(reconciler, model(namespace, "newcomer", replicas=1, npusPerReplica=4), [], {})
        assert docker_client.inspect_service(stack["ID"])["Version"]["Index"] == versions
    finally:
        docker_client.remove_service(stack["ID"])


def test_a_missing_overlay_network_is_created_and_removed_with_its_last_deployment(
    docker_client: docker.APIClient, namespace: str, reconciler: Reconciler
) -> None:
    network = f"{namespace}-net"
    md = model(namespace, "netted", replicas=1, network={"name": network})
    try:
        converge(reconciler, md)
        found = docker_client.networks(names=[network])
        assert len(found) == 1
        inspected = docker_client.inspect_network(found[0]["Id"])
        assert (inspected["Driver"], inspected["Attachable"]) == ("overlay", True)
        assert inspected["Labels"]["npuswarm.io/managed-by"] == "npuswarm"
        reconciler.finalize(namespace, "netted", md.metadata.uid)

        def gone() -> bool:
            # Swarm may still be detaching the removed task: a later pass removes it then.
            serve(reconciler, model(namespace, "unrelated", replicas=0), [], {})
            return not docker_client.networks(names=[network])

        wait_for(gone, "the network to go", timeout=30)
    finally:
        for leftover in docker_client.networks(names=[network]):
            docker_client.remove_network(leftover["Id"])
