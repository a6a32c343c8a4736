"""bench/enginesim.py, driven by the real docker-py client over loopback HTTP.

The fleet benchmark trusts this server to answer like a Swarm manager; these tests hold it to
the shapes and rules npuswarm depends on (versions, filters, task states, events).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import docker
import docker.errors
import pytest

from enginesim import EngineSim
from localrun import free_port
from npuswarm.api import labels
from npuswarm.gateway import protocol
from npuswarm.gateway.credentials import Credentials
from npuswarm.nodehealth import agents
from npuswarm.nodehealth.runner import NodeChecker
from npuswarm.settings import Settings
from npuswarm.swarm import Swarm
from tests.swarm.conftest import wait_for

OWNED = {labels.MANAGED_BY: labels.MANAGED_BY_VALUE, labels.OWNER_NAMESPACE: "ns"}


@pytest.fixture
def sim() -> Iterator[EngineSim]:
    with EngineSim(nodes=3, task_delay=0.1).start() as running:
        yield running


@pytest.fixture
def client(sim: EngineSim) -> docker.APIClient:
    return docker.APIClient(base_url=sim.url, version="auto", timeout=10)


def template(node_id: str, image: str = "img:1") -> dict[str, Any]:
    return {
        "ContainerSpec": {"Image": image, "Labels": {labels.SPEC_HASH: image}},
        "Placement": {"Constraints": [f"node.id=={node_id}"]},
        "Networks": [{"Target": "vllm-net", "Aliases": ["m"]}],
    }


def tasks_of(client: docker.APIClient, service_id: str) -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = client.tasks(filters={"service": service_id})
    return sorted(tasks, key=lambda t: t["CreatedAt"])


def sim_get(sim: EngineSim, path: str, method: str = "GET") -> Any:
    request = urllib.request.Request(sim.http_url + path, method=method)
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def test_engine_identity_and_nodes(client: docker.APIClient) -> None:
    assert client.version()["ApiVersion"] == "1.41"
    assert client.ping() is True
    assert client.info()["Swarm"]["LocalNodeState"] == "active"
    nodes = client.nodes()
    assert [n["Description"]["Hostname"] for n in nodes] == ["sim-0001", "sim-0002", "sim-0003"]
    npus = [
        r["NamedResourceSpec"] for r in nodes[0]["Description"]["Resources"]["GenericResources"]
    ]
    assert npus == [{"Kind": "NPU", "Value": f"davinci{i}"} for i in range(8)]
    assert {n["Status"]["State"] for n in nodes} == {"ready"}
    assert {n["Spec"]["Availability"] for n in nodes} == {"active"}


def test_create_schedules_a_task_that_becomes_running_on_its_node(client: docker.APIClient) -> None:
    node = client.nodes()[1]["ID"]
    service_id = client.create_service(template(node), name="a-0", labels=OWNED)["ID"]
    service = client.inspect_service("a-0")
    assert service["ID"] == service_id
    assert service["Spec"]["Labels"] == OWNED
    # Swarm keeps network ids, not the names it was given.
    vllm_net = client.networks(names=["vllm-net"])[0]["Id"]
    assert service["Spec"]["TaskTemplate"]["Networks"][0]["Target"] == vllm_net
    running = wait_for(
        lambda: [t for t in tasks_of(client, service_id) if t["Status"]["State"] == "running"],
        "the task to run",
        timeout=10,
        interval=0.05,
    )
    task = running[0]
    assert task["NodeID"] == node
    assert task["DesiredState"] == "running"
    assert task["Spec"]["ContainerSpec"]["Labels"] == {labels.SPEC_HASH: "img:1"}
    with pytest.raises(docker.errors.APIError) as taken:
        client.create_service(template(node), name="a-0")
    assert taken.value.status_code == 409


def test_label_filter_unfiltered_list_and_status(client: docker.APIClient, sim: EngineSim) -> None:
    node = client.nodes()[0]["ID"]
    client.create_service(template(node), name="owned", labels=OWNED)
    client.create_service(template(node), name="foreign", labels={"team": "x"})
    owned = client.services(filters={"label": labels.OWNED_FILTER})
    assert [s["Spec"]["Name"] for s in owned] == ["owned"]
    assert sorted(s["Spec"]["Name"] for s in client.services()) == ["foreign", "owned"]
    assert client.services(filters={"label": "team"})[0]["Spec"]["Name"] == "foreign"
    assert client.services(filters={"label": "team=y"}) == []
    wait_for(lambda: sim.stats()["running_tasks"] == 2, "both tasks to run", timeout=10)
    counts = {s["Spec"]["Name"]: s["ServiceStatus"] for s in client.services(status=True)}
    assert counts["owned"] == {"RunningTasks": 1, "DesiredTasks": 1, "CompletedTasks": 0}
    assert "ServiceStatus" not in client.services()[0]


def test_update_replaces_the_task_and_refuses_a_stale_version(client: docker.APIClient) -> None:
    node = client.nodes()[2]["ID"]
    service_id = client.create_service(template(node), name="u", labels=OWNED)["ID"]
    version = client.inspect_service(service_id)["Version"]["Index"]
    client.update_service(
        service_id, version, task_template=template(node, "img:2"), name="u", labels=OWNED
    )
    with pytest.raises(docker.errors.APIError) as stale:
        client.update_service(
            service_id, version, task_template=template(node, "img:3"), name="u", labels=OWNED
        )
    assert stale.value.status_code == 500
    assert "update out of sequence" in str(stale.value.explanation)

    def settled() -> list[tuple[str, str, str]]:
        states = [
            (t["Spec"]["ContainerSpec"]["Image"], t["Status"]["State"], t["DesiredState"])
            for t in tasks_of(client, service_id)
        ]
        return states if states[-1][1] == "running" else []

    assert wait_for(settled, "the new task to run", timeout=10, interval=0.05) == [
        ("img:1", "shutdown", "shutdown"),
        ("img:2", "running", "running"),
    ]
    # Finishing the rollout bumps the version again, as Swarm does.
    service = client.inspect_service(service_id)
    assert service["UpdateStatus"]["State"] == "completed"
    assert service["Version"]["Index"] > version + 1


def test_npuswarm_update_retries_a_stale_version(client: docker.APIClient) -> None:
    node = client.nodes()[0]["ID"]
    service_id = client.create_service(template(node), name="r", labels=OWNED)["ID"]
    stale = client.inspect_service(service_id)["Version"]["Index"] - 1
    spec = {
        "Name": "r",
        "Labels": OWNED,
        "TaskTemplate": template(node, "img:9"),
        "Mode": {"Replicated": {"Replicas": 1}},
    }
    Swarm(base_url=client.base_url.replace("http://", "tcp://")).update_service(
        service_id, stale, spec
    )
    image = client.inspect_service(service_id)["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]
    assert image == "img:9"


def test_remove_takes_the_tasks_along(client: docker.APIClient, sim: EngineSim) -> None:
    node = client.nodes()[0]["ID"]
    service_id = client.create_service(template(node), name="gone", labels=OWNED)["ID"]
    client.remove_service(service_id)
    assert client.services() == []
    assert client.tasks() == []
    with pytest.raises(docker.errors.NotFound):
        client.remove_service(service_id)
    assert sim.stats()["writes"] == 3


def test_events_stream_service_and_node_changes(client: docker.APIClient, sim: EngineSim) -> None:
    seen: list[dict[str, Any]] = []
    stream = client.events(decode=True, filters={"type": ["service", "node"]})

    def follow() -> None:
        for event in stream:
            seen.append(event)

    threading.Thread(target=follow, daemon=True).start()
    wait_for(lambda: sim.stats()["requests"].get("GET /events"), "the stream", timeout=5)
    node = client.nodes()[1]
    service_id = client.create_service(template(node["ID"]), name="e", labels=OWNED)["ID"]
    version = client.inspect_service(service_id)["Version"]["Index"]
    client.update_service(
        service_id, version, task_template=template(node["ID"], "img:2"), name="e"
    )
    client.remove_service(service_id)
    sim_get(sim, f"/sim/nodes/{node['ID']}/down", method="POST")
    wait_for(lambda: any(e["Type"] == "node" for e in seen), "the node event", timeout=5)
    stream.close()
    service_events = [(e["Action"], e["Actor"]["ID"]) for e in seen if e["Type"] == "service"]
    assert service_events[0] == ("create", service_id)
    assert service_events[1] == ("update", service_id)
    assert service_events[-1] == ("remove", service_id)
    node_event = next(e for e in seen if e["Type"] == "node")
    assert node_event["Actor"]["ID"] == node["ID"]
    assert node_event["Actor"]["Attributes"]["state.new"] == "down"
    assert all(e["Actor"]["Attributes"]["name"] for e in seen)
    assert all(e["timeNano"] // 1_000_000_000 == e["time"] for e in seen)


def test_node_down_leaves_the_replacement_pending_until_it_is_back(
    client: docker.APIClient, sim: EngineSim
) -> None:
    node = client.nodes()[2]["ID"]
    service_id = client.create_service(template(node), name="d", labels=OWNED)["ID"]
    wait_for(
        lambda: tasks_of(client, service_id)[0]["Status"]["State"] == "running",
        "the task to run",
        timeout=10,
        interval=0.05,
    )
    sim_get(sim, f"/sim/nodes/{node}/down", method="POST")
    old, new = tasks_of(client, service_id)
    assert (old["Status"]["State"], old["DesiredState"]) == ("running", "shutdown")
    assert new["Status"]["State"] == "pending"
    assert "no suitable node" in new["Status"]["Err"]
    assert client.inspect_node(node)["Status"]["State"] == "down"
    sim_get(sim, f"/sim/nodes/{node}/up", method="POST")
    wait_for(
        lambda: tasks_of(client, service_id)[-1]["Status"]["State"] == "running",
        "the replacement to run",
        timeout=10,
        interval=0.05,
    )
    assert tasks_of(client, service_id)[0]["Status"]["State"] == "shutdown"


def test_counters_seed_and_reset(client: docker.APIClient, sim: EngineSim) -> None:
    seeded = sim_get(sim, "/sim/seed?count=6&prefix=s", method="POST")["IDs"]
    assert len(seeded) == 6
    summary = sim_get(sim, "/sim/services")
    assert sorted(s["Name"] for s in summary) == [f"s-{i}" for i in range(6)]
    assert {s["Running"] for s in summary} == {1}
    sim_get(sim, "/sim/reset", method="POST")
    client.nodes()
    client.services()
    client.services()
    client.tasks()
    stats = sim_get(sim, "/sim/stats")
    assert stats["requests"] == {"GET /nodes": 1, "GET /services": 2, "GET /tasks": 1}
    assert (stats["list_calls"], stats["writes"], stats["running_tasks"]) == (4, 0, 6)


def test_npuswarm_observes_the_sim(client: docker.APIClient, sim: EngineSim) -> None:
    nodes = client.nodes()
    service_id = client.create_service(
        template(nodes[1]["ID"]),
        name="ns-m-0",
        labels={**OWNED, labels.OWNER_NAME: "m", labels.SPEC_HASH: "img:1"},
    )["ID"]
    client.create_service(template(nodes[0]["ID"]), name="not-ours", labels={})
    wait_for(
        lambda: sim.stats()["running_tasks"] == 2, "both tasks to run", timeout=10, interval=0.05
    )
    sim.reset_counters()
    started = time.monotonic()
    snapshot = Swarm(base_url=sim.url).observe()
    assert time.monotonic() - started < 10
    assert [n.hostname for n in snapshot.nodes] == ["sim-0001", "sim-0002", "sim-0003"]
    assert all(n.npus == frozenset(range(8)) and n.accepts_new_replicas for n in snapshot.nodes)
    (service,) = snapshot.services
    assert (service.id, service.deployment) == (service_id, "ns/m")
    assert service.running_current_spec
    assert service.spec["TaskTemplate"]["Networks"][0]["Target"] == "vllm-net"
    assert sim.stats()["list_calls"] == 4


# --- what the node agents need (nodehealth/runner.py, bench/agentsim.py) ----------------------


def test_secrets_are_created_listed_by_label_and_removed_once_unused(
    client: docker.APIClient, sim: EngineSim
) -> None:
    kept = client.create_secret("a-key", b"one", labels={"kind": "key", "owner": "a"})["ID"]
    other = client.create_secret("b-key", b"two", labels={"kind": "key"})["ID"]
    with pytest.raises(docker.errors.APIError, match="already exists"):
        client.create_secret("a-key", b"again")
    listed = client.secrets(filters={"label": ["kind=key", "owner=a"]})
    assert [s["ID"] for s in listed] == [kept]
    assert listed[0]["Spec"] == {"Name": "a-key", "Labels": {"kind": "key", "owner": "a"}}
    assert "Data" not in client.inspect_secret(kept)["Spec"], "Swarm never returns the data"
    assert sim.secret_data(kept) == b"one"
    node = client.nodes()[0]["ID"]
    spec = template(node) | {
        "ContainerSpec": {
            "Image": "img:1",
            "Secrets": [{"File": {"Name": "f"}, "SecretID": kept, "SecretName": "a-key"}],
        }
    }
    client.create_service(spec, name="uses-a")
    with pytest.raises(docker.errors.APIError, match="in use by the following service: uses-a"):
        client.remove_secret(kept)
    with pytest.raises(docker.errors.APIError, match="secret not found"):
        client.create_service(
            spec | {"ContainerSpec": {"Image": "i", "Secrets": [{"SecretID": "nope"}]}}, name="x"
        )
    client.remove_secret(other)
    client.remove_service("uses-a")
    client.remove_secret(kept)
    assert client.secrets() == []
    with pytest.raises(docker.errors.NotFound):
        client.remove_secret(kept)


def test_node_update_writes_labels_and_refuses_a_stale_version(client: docker.APIClient) -> None:
    node = client.nodes()[1]
    version = node["Version"]["Index"]
    spec = node["Spec"] | {"Labels": {labels.NODE_AGENT_NPUS: "0-7"}}
    client.update_node(node["ID"], version, spec)
    updated = client.inspect_node(node["ID"])
    assert updated["Spec"]["Labels"] == {labels.NODE_AGENT_NPUS: "0-7"}
    assert updated["Version"]["Index"] > version
    with pytest.raises(docker.errors.APIError, match="update out of sequence"):
        client.update_node(node["ID"], version, node["Spec"])
    filtered = client.nodes(filters={"node.label": f"{labels.NODE_AGENT_NPUS}=0-7"})
    assert [n["ID"] for n in filtered] == [node["ID"]]


def test_a_global_service_runs_one_task_per_node_its_constraint_matches(
    client: docker.APIClient, sim: EngineSim
) -> None:
    nodes = client.nodes()
    constraint = f"node.labels.{labels.NODE_AGENT_NPUS}==0-7"
    service_id = client.create_service(
        {"ContainerSpec": {"Image": "agent:1"}, "Placement": {"Constraints": [constraint]}},
        name="agents",
        mode={"Global": {}},
    )["ID"]
    assert tasks_of(client, service_id) == [], "no node carries the label yet"
    for node in nodes[:2]:
        Swarm(base_url=sim.url).set_node_label(node["ID"], labels.NODE_AGENT_NPUS, "0-7")

    def running_on() -> set[str]:
        return {
            t["NodeID"]
            for t in tasks_of(client, service_id)
            if t["Status"]["State"] == "running" and t["DesiredState"] == "running"
        }

    wait_for(lambda: len(running_on()) == 2, "two agent tasks", timeout=10, interval=0.05)
    assert running_on() == {n["ID"] for n in nodes[:2]}
    assert {t["Slot"] for t in tasks_of(client, service_id)} == {0}, "global tasks have no slot"
    Swarm(base_url=sim.url).set_node_label(nodes[0]["ID"], labels.NODE_AGENT_NPUS, "0-3")
    wait_for(
        lambda: running_on() == {nodes[1]["ID"]},
        "the relabelled node's task to stop",
        timeout=10,
        interval=0.05,
    )


ROOT = "fleet-root-key-for-tests-0123456789"


def test_the_operators_node_checks_start_and_read_the_simulated_agents(
    client: docker.APIClient, sim: EngineSim
) -> None:
    """The real NodeChecker (nodehealth/runner.py) against the sim: it labels the nodes,
    creates the agents' secrets and global service, and reads every node's agent over TLS
    pinned to npuswarm's CA, signed, at the node's own 127/8 address."""
    port = free_port()
    sim.start_agents(port)
    settings = Settings(agent_image="npuswarm:1", agent_port=port, root_key=ROOT)
    credentials = Credentials(ROOT, settings.instance)
    swarm = Swarm(base_url=sim.url)
    checker = NodeChecker(
        swarm, settings, lambda: SimpleNamespace(snapshot=swarm.observe(), plans={}), credentials
    )
    try:
        nodes = swarm.observe().nodes
        assert len({n.addr for n in nodes}) == 3 and all(n.addr.startswith("127.") for n in nodes)

        def all_validated() -> bool:
            checker.step()
            verdicts = checker.verdicts()
            return len(verdicts) == 3 and all(v.ok for v in verdicts.values())

        wait_for(all_validated, "every node's agent to answer", timeout=15, interval=0.1)
        assert checker.agents_up() == [("sim-0001", True), ("sim-0002", True), ("sim-0003", True)]
        readings = checker.readings()
        assert {n: (h.error, len(h.npus)) for n, h in readings.items()} == {
            n.id: ("", 8) for n in nodes
        }
        (service,) = client.services(filters={"label": f"{agents.AGENT}=default"})
        assert service["Spec"]["Mode"] == {"Global": {}}
        assert len(client.secrets(filters={"label": f"{agents.AGENT}=default"})) == 2
        assert {n["Spec"]["Labels"][agents.NODE_LABEL] for n in client.nodes()} == {"0-7"}

        answered = dict(sim.agents.stats()["counts"])
        checker.read_now(nodes)
        counts = sim.agents.stats()["counts"]
        assert counts.get("answered 304", 0) - answered.get("answered 304", 0) == 3
        assert counts["connections"] == answered["connections"], "keep-alive: no new handshake"

        sim_get(sim, f"/sim/nodes/{nodes[1].id}/npus/3/health?state=Critical", method="POST")
        checker.read_now(nodes)
        unhealthy = {
            (h.hostname, npu)
            for h in checker.readings().values()
            for npu, r in h.npus.items()
            if not r.healthy
        }
        assert unhealthy == {("sim-0002", 3)}
        sim_get(sim, f"/sim/nodes/{nodes[1].id}/npus/3/health?state=OK", method="POST")
        checker.read_now(nodes)
        assert all(r.healthy for h in checker.readings().values() for r in h.npus.values())

        # An unsigned request is refused by the agent's own check.
        connection = protocol.PinnedHTTPS(
            nodes[0].addr, port, agents.IDENTITY.hostname, credentials.client_context(), 5
        )
        connection.request("GET", agents.STATE_PATH)
        assert connection.getresponse().status == 401
        connection.close()

        # No agent task on a node: nothing answers there, so its agent is down.
        client.remove_service(service["ID"])
        checker.read_now(nodes)
        assert checker.agents_up() == [
            ("sim-0001", False),
            ("sim-0002", False),
            ("sim-0003", False),
        ]
    finally:
        checker.close()
