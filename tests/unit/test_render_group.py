"""Rendering a multi-node replica (issue 20 item 3): one service per member, pinned, on the host
network, with the leader's address, ranks, --headless for the others, the node's HCCL
address and interface, and host ports that never collide on a node."""

from __future__ import annotations

from npuswarm.api import labels
from npuswarm.core import gang
from npuswarm.core.diff import Applied  # noqa: F401  (the pass's types load with render)
from npuswarm.core.nodes import NodeInfo
from npuswarm.core.placement import Allocation, PlacementResult, place_all
from npuswarm.core.render import render_service

from .builders import NOW, deployment, node

GRACE = 60.0


def addressed(node_id: str, addr: str, **labels_: str) -> NodeInfo:
    return node(node_id, labels=labels_).model_copy(update={"addr": addr})


NODES = [addressed("a", "10.0.0.1", **{labels.NODE_HCCL_INTERFACE: "enp189s0f0"}),
         addressed("b", "10.0.0.2"), addressed("c", "10.0.0.3")]
DS = deployment("ds", nodesPerReplica=2, npusPerReplica=8,
                engine={"tensorParallelSize": 4, "dataParallelSize": 4, "enableExpertParallel": True})


def placed(deployments: list, nodes: list[NodeInfo] = NODES, allocations: list[Allocation] | None = None) -> PlacementResult:
    return place_all(deployments, nodes, allocations or [], now=NOW, lost_node_grace_seconds=GRACE)


def test_leader_and_headless_member_get_the_tutorial_flags_and_env() -> None:
    result = placed([DS])
    leader, member = (result.assignments[(DS.key, slot)] for slot in ("0-m0", "0-m1"))
    ports = gang.GroupPorts.of_block(0)
    lead = render_service(DS, leader, hccl_interface="eth9")
    head = render_service(DS, member, hccl_interface="eth9")
    lead_args = lead["TaskTemplate"]["ContainerSpec"]["Args"]
    head_args = head["TaskTemplate"]["ContainerSpec"]["Args"]
    assert lead_args[lead_args.index("--port") + 1] == str(ports.api)
    expected = ["--data-parallel-size", "4", "--data-parallel-size-local", "2",
                "--data-parallel-address", "10.0.0.1", "--data-parallel-rpc-port", str(ports.rpc)]
    assert " ".join(expected) in " ".join(lead_args) and "--headless" not in lead_args
    assert " ".join([*expected, "--headless", "--data-parallel-start-rank", "2"]) in " ".join(head_args)
    assert "--enable-expert-parallel" in head_args
    lead_env = set(lead["TaskTemplate"]["ContainerSpec"]["Env"])
    head_env = set(head["TaskTemplate"]["ContainerSpec"]["Env"])
    assert {"HCCL_IF_IP=10.0.0.1", "GLOO_SOCKET_IFNAME=enp189s0f0", "TP_SOCKET_IFNAME=enp189s0f0",
            "HCCL_SOCKET_IFNAME=enp189s0f0", f"HCCL_IF_BASE_PORT={ports.hccl_base}"} <= lead_env
    # Node b has no interface label: the operator's default.
    assert {"HCCL_IF_IP=10.0.0.2", "GLOO_SOCKET_IFNAME=eth9", "ASCEND_VISIBLE_DEVICES=0,1,2,3,4,5,6,7"} <= head_env
    for spec, node_id in ((lead, leader.node_id), (head, member.node_id)):
        assert spec["TaskTemplate"]["Networks"] == [{"Target": "host"}]
        assert spec["TaskTemplate"]["Placement"]["Constraints"] == [f"node.id=={node_id}"]
        assert "Ports" not in spec["EndpointSpec"]
        assert spec["Labels"][labels.PORT_BLOCK] == "0"
    assert head["TaskTemplate"]["ContainerSpec"]["Healthcheck"] == {"Test": ["NONE"]}
    assert str(ports.api) in lead["TaskTemplate"]["ContainerSpec"]["Healthcheck"]["Test"][-1]


def test_no_interface_known_leaves_the_socket_interfaces_to_hccl() -> None:
    member = placed([DS]).assignments[(DS.key, "0-m1")]
    env = render_service(DS, member)["TaskTemplate"]["ContainerSpec"]["Env"]
    assert not [e for e in env if "IFNAME" in e] and "HCCL_IF_IP=10.0.0.2" in env


def test_two_groups_sharing_a_node_get_different_port_blocks_and_keep_them() -> None:
    other = deployment("qw", created="2026-01-02T00:00:00Z", nodesPerReplica=2, npusPerReplica=4)
    small = deployment("ds", nodesPerReplica=2, npusPerReplica=4)
    result = placed([small, other])
    blocks = {a.deployment: a.group.ports.block for a in result.assignments.values() if a.group}
    assert blocks == {small.key: 0, other.key: 1}
    # After a restart the blocks are read back from the services' labels, not re-chosen.
    claims = [Allocation(deployment=a.deployment, slot=a.slot, node_id=a.node_id, npus=a.npus,
                         service=a.slot, port_block=a.group.ports.block)
              for a in result.assignments.values() if a.group]
    swapped = [Allocation(**{**c.model_dump(), "port_block": 1 - (c.port_block or 0)}) for c in claims]
    again = placed([small, other], allocations=swapped)
    assert {a.deployment: a.group.ports.block for a in again.assignments.values() if a.group} == {
        small.key: 1, other.key: 0}


def test_port_blocks_on_distinct_nodes_may_repeat() -> None:
    first = deployment("ds", nodesPerReplica=2, npusPerReplica=8)
    second = deployment("qw", created="2026-01-02T00:00:00Z", nodesPerReplica=1, npusPerReplica=8,
                        engine={"dataParallelSize": 8})
    result = placed([first], nodes=NODES[:2])
    assert {a.group.ports.block for a in result.assignments.values() if a.group} == {0}
    assert all(a.group is None for a in placed([second]).assignments.values())


def test_export_stack_writes_one_compose_service_per_member_on_the_host_network() -> None:
    import yaml

    from npuswarm.stackfiles.exporter import export_stack

    result = placed([DS])
    rendered = {DS.key: {a.slot: render_service(DS, a) for a in result.assignments.values()}}
    compose = yaml.safe_load(export_stack([DS], rendered))
    services = compose["services"]
    assert sorted(services) == ["default-ds-0-m0", "default-ds-0-m1"]
    leader, member = services["default-ds-0-m0"], services["default-ds-0-m1"]
    assert "--headless" in member["command"] and "--headless" not in leader["command"]
    assert member["healthcheck"] == {"disable": True} and "test" in leader["healthcheck"]
    assert all(list(s["networks"]) == ["host"] for s in services.values())
    assert compose["networks"] == {"host": {"external": True}}
    assert leader["deploy"]["placement"]["constraints"][0].startswith("node.id==")
