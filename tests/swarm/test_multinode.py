"""Multi-node replicas against the real Swarm (issue 20 items 2 and 3).

The local Swarm has one node, so a real pass can show the all-or-none rule (a group of two
nodes holds nothing, a single-node deployment beside it is served) and the member services'
specs can be checked as Swarm stores them. Groups that run on several nodes are the lab's.
"""

from __future__ import annotations

import docker

from npuswarm.api import labels
from npuswarm.core import gang
from npuswarm.core.placement import Assignment, GroupSeat, member_slot
from npuswarm.core.render import Renderer, render_service, service_name
from npuswarm.reconcile import Reconciler
from npuswarm.swarm import Swarm

from .conftest import converge, model, serve, wait_for


def owned(client: docker.APIClient, namespace: str, name: str) -> list[dict]:
    return client.services(filters={"label": [f"npuswarm.io/owner-namespace={namespace}",
                                              f"npuswarm.io/owner-name={name}"]})


def wait_until_running(client: docker.APIClient, service_id: str, what: str) -> None:
    seen: list[str] = []

    def running() -> bool:
        tasks = client.tasks(filters={"service": service_id})
        seen.extend(f"{t['Status']['State']}: {t['Status'].get('Err', '')}" for t in tasks)
        return any(t["Status"]["State"] == "running" for t in tasks)

    try:
        wait_for(running, what, timeout=120)
    except BaseException:
        print("task states seen:", sorted(set(seen))[-10:])
        raise


def group_spec() -> dict:
    # A group runs on the host network: no overlay network, no published port.
    return {"nodesPerReplica": 2, "npusPerReplica": 2, "network": None,
            "engine": {"tensorParallelSize": 1, "port": 8000}}


def test_a_group_larger_than_the_swarm_holds_nothing_and_a_replica_beside_it_is_served(
    docker_client: docker.APIClient, namespace: str, reconciler: Reconciler
) -> None:
    group = model(namespace, "big", **group_spec())
    # No overlay network: the tenancy policy would want it shared with this namespace.
    single = model(namespace, "small", created="2026-01-02T00:00:00Z", network=None)
    view = serve(reconciler, group, [group, single], {})
    assert owned(docker_client, namespace, "big") == []
    messages = [r.message or "" for r in view.status.replicaStatuses]
    assert len(messages) == 2
    hostname = docker_client.info()["Name"]
    for message in messages:
        assert "group 0 of 2 nodes: needs 2 of 2 node(s) with 2 free NPUs each; 1 fit" in message
        assert hostname in message
    assert view.status.placedReplicas == 0 and view.status.npus == 0
    done = converge(reconciler, single, [group, single])
    assert done.status.readyReplicas == 1
    assert owned(docker_client, namespace, "big") == []


def test_member_services_are_stored_with_their_args_env_network_and_pin(
    docker_client: docker.APIClient, namespace: str
) -> None:
    md = model(namespace, "ds", **group_spec())
    swarm = Swarm()
    snapshot = swarm.observe()
    node = snapshot.nodes[0]
    ports = gang.GroupPorts.of_block(gang.PORT_BLOCKS - 1)  # out of the way of other tests
    # A short stop grace: members on the host network keep their ports until they stop, and
    # the next test's group takes the same block.
    renderer = Renderer(hccl_interface="lo", stop_grace_seconds=1)
    specs = []
    # Both members on the one node, each with its own NPUs, as two nodes would have them.
    for member, npus in ((0, frozenset({0, 1})), (1, frozenset({2, 3}))):
        seat = GroupSeat(member=member, members=2, leader_address=node.addr, address=node.addr,
                         interface="", ports=ports)
        assignment = Assignment(deployment=md.key, slot=member_slot(0, member), node_id=node.id,
                                npus=npus, kept=False, group=seat)
        spec = renderer.render(md, assignment, name=service_name(md, assignment.slot))
        service_id = swarm.create_service(spec)
        specs.append(spec)
        if member == 0:
            # Both members share this one node's API port here, and the local Swarm's image
            # serves HTTP even with --headless: the leader must hold the port first.
            wait_until_running(docker_client, service_id, "the leader's task to run")
    stored = {s["Spec"]["Name"]: s for s in owned(docker_client, namespace, "ds")}
    assert set(stored) == {s["Name"] for s in specs}
    observed = {s.name: s for s in swarm.observe().services}
    for spec in specs:
        service = stored[spec["Name"]]
        template = service["Spec"]["TaskTemplate"]
        assert template["Placement"]["Constraints"] == [f"node.id=={node.id}"]
        # Swarm stores the host network's cluster-wide id; the snapshot reads it as "host".
        assert len(template["Networks"]) == 1
        assert observed[spec["Name"]].spec["TaskTemplate"]["Networks"] == [{"Target": "host"}]
        assert "Ports" not in (service["Spec"].get("EndpointSpec") or {})
        args = template["ContainerSpec"]["Args"]
        env = dict(e.split("=", 1) for e in template["ContainerSpec"]["Env"])
        assert args[args.index("--data-parallel-address") + 1] == node.addr
        assert args[args.index("--data-parallel-rpc-port") + 1] == str(ports.rpc)
        assert env["HCCL_IF_IP"] == node.addr and env["GLOO_SOCKET_IFNAME"] == "lo"
        assert env["HCCL_IF_BASE_PORT"] == str(ports.hccl_base)
        assert service["Spec"]["Labels"][labels.PORT_BLOCK] == str(ports.block)
        # Swarm keeps what was rendered: the next pass would not rewrite (restart) the member.
        seen = observed[spec["Name"]]
        assert renderer.matches(seen.id, seen.version, seen.spec, spec)
    leader, member = (stored[s["Name"]] for s in specs)
    assert "--headless" not in leader["Spec"]["TaskTemplate"]["ContainerSpec"]["Args"]
    member_args = member["Spec"]["TaskTemplate"]["ContainerSpec"]["Args"]
    assert member_args[member_args.index("--headless") + 1:][:2] == ["--data-parallel-start-rank", "2"]
    # The leader really runs on the host network (waited for above).
    assert any(t["Status"]["State"] == "running"
               for t in docker_client.tasks(filters={"service": leader["ID"]}))
    # The snapshot reads the block back from the label: the source of truth after a restart.
    blocks = {a.slot: a.port_block for a in swarm.observe().allocations() if a.deployment == md.key}
    assert blocks == {member_slot(0, 0): ports.block, member_slot(0, 1): ports.block}
