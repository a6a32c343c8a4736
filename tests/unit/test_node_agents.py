"""The node agents (nodehealth/agents.py, nodehealth/runner.py): the NPU-set label, one global
service per NPU set, their secrets, what an answer means, and the checker that keeps them and
feeds the pass, against the in-memory Swarm with agents that answer from a dict."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from npuswarm.api import labels
from npuswarm.cli import read_agents
from npuswarm.core.nodes import NodeInfo
from npuswarm.core.pipeline import Desired
from npuswarm.core.snapshot import ObservedSecret, snapshot_from_engine
from npuswarm.gateway.credentials import Credentials
from npuswarm.nodehealth import agent, agents, npusmi
from npuswarm.nodehealth import checks as node_checks
from npuswarm.nodehealth.runner import Answer, NodeChecker
from npuswarm.reconcile import Reconciler
from npuswarm.settings import Settings

from .builders import NOW, deployment, node
from .memswarm import MemorySwarm

ROOT = "unit-root-key-0123456789"
CREDENTIALS = Credentials(ROOT, "default")
EIGHT = "0,1,2,3,4,5,6,7"


def test_the_npu_set_label_is_compact_and_has_no_comma() -> None:
    assert agents.set_label(range(8)) == "0-7"
    assert agents.set_label({0, 1, 2, 3, 6}) == "0-3_6"
    assert agents.set_label({5}) == "5"
    for ids in ({0, 1, 2, 3, 6}, set(range(16)), {1, 3, 5}):
        assert agents.parse_set_label(agents.set_label(ids)) == frozenset(ids)


def test_only_npu_nodes_whose_label_differs_are_labelled() -> None:
    nodes = [
        node("a", labels={agents.NODE_LABEL: "0-7"}),
        node("b"),
        node("c", npus=4, labels={agents.NODE_LABEL: "0-7"}),
        node("d", npus=0),
    ]
    assert agents.label_writes(nodes) == {"b": "0-7", "c": "0-3"}
    assert agents.wanted_sets(nodes) == ["0-3", "0-7"]


def spec(npu_set: str = "0-7", image: str = "npuswarm:1") -> dict[str, Any]:
    mounts = [agents.SecretMount("k", agents.CREDENTIAL_FILE, "id1")]
    return agents.agent_spec(npu_set, image, "default", 9109, 30.0, mounts)


def test_an_agent_is_a_global_service_on_its_npu_set_asking_for_those_npus() -> None:
    rendered = spec()
    container = rendered["TaskTemplate"]["ContainerSpec"]
    assert rendered["Mode"] == {"Global": {}}
    assert rendered["TaskTemplate"]["Placement"]["Constraints"] == [
        "node.labels.io.npuswarm.agent-npus==0-7"
    ]
    # The node's name from Swarm's template: the node label of the NPU metrics it serves.
    assert container["Env"] == [f"ASCEND_VISIBLE_DEVICES={EIGHT}", "NPUSWARM_NODE={{.Node.Hostname}}"]
    assert container["Command"] == ["npuswarm", "agent"]
    assert container["Args"][-2:] == ["--npus", EIGHT], "what was asked, apart from the env"
    assert container["Secrets"][0]["SecretID"] == "id1"
    (port,) = rendered["EndpointSpec"]["Ports"]
    assert (port["PublishedPort"], port["PublishMode"]) == (9109, "host")
    assert labels.MANAGED_BY not in rendered["Labels"], "no replica, no orphan, no gateway"


def test_observe_skips_the_agent_it_shares_npus_and_claims_none() -> None:
    raw = {"ID": "a1", "Spec": spec()}
    task = {
        "ID": "t",
        "ServiceID": "a1",
        "NodeID": "n1",
        "DesiredState": "running",
        "Status": {"State": "running"},
    }
    snapshot = snapshot_from_engine([], [raw], [task], [])
    assert snapshot.foreign == [] and snapshot.services == [] and snapshot.allocations() == ()


def test_agent_writes_create_update_remove_and_nothing_when_equal() -> None:
    wanted = {"0-7": spec("0-7"), "0-3": spec("0-3")}
    observed = [
        {"ID": "s1", "Version": {"Index": 3}, "Spec": spec("0-7")},
        {"ID": "s2", "Version": {"Index": 3}, "Spec": spec("0-15")},
    ]
    writes = agents.agent_writes(wanted, observed)
    assert [(w.kind, w.name) for w in writes] == [
        ("remove", "npuswarm-agent-default-0-15"),
        ("create", "npuswarm-agent-default-0-3"),
    ]
    changed = {"0-7": spec("0-7", image="npuswarm:2")}
    (update,) = agents.agent_writes(changed, observed[:1])
    assert (update.kind, update.service_id, update.version) == ("update", "s1", 3)
    assert agents.agent_writes({"0-7": spec("0-7")}, observed[:1]) == []


def test_agent_secrets_are_made_once_and_then_found() -> None:
    first = agents.plan_secrets([], CREDENTIALS, "default", NOW)
    assert len(first.create) == 2 and [m.file for m in first.mounts] == [
        agents.CREDENTIAL_FILE,
        agents.TLS_FILE,
    ]
    assert all(labels.MANAGED_BY not in s.labels for s in first.create)
    observed = [ObservedSecret(f"id{i}", s.name, s.labels) for i, s in enumerate(first.create)]
    again = agents.plan_secrets(observed, CREDENTIALS, "default", NOW + timedelta(days=1))
    assert again.create == [] and again.mounts == first.mounts and again.stale == []
    rotated = agents.plan_secrets(observed, Credentials(ROOT + "x", "default"), "default", NOW)
    assert len(rotated.create) == 2 and {s.name for s in rotated.stale} == {
        s.name for s in observed
    }


def ok_answer(npus: str = EIGHT, table: str = "") -> dict[str, Any]:
    return {
        "validation": {
            "missing": [],
            "env": {"ASCEND_VISIBLE_DEVICES": npus, "ASCEND_DOCKER_RUNTIME": "True"},
            "npus": npus,
        },
        "npuSmi": {"text": table or npu_table(set()), "error": ""},
    }


def no_runtime_answer(npus: str = EIGHT) -> dict[str, Any]:
    ids = [int(i) for i in npus.split(",")]
    return {
        "validation": {
            "missing": [f"/dev/davinci{i}" for i in ids] + list(node_checks.CONTROL_DEVICES),
            "env": {"ASCEND_VISIBLE_DEVICES": npus},
            "npus": npus,
        },
        "npuSmi": {"text": "", "error": "[Errno 2] No such file or directory: npu-smi"},
    }


def npu_table(unhealthy: set[int]) -> str:
    rows = []
    for npu in range(8):
        health = "Critical" if npu in unhealthy else "OK"
        rows.append(
            f"| {npu:<5} 910B4               | {health:<13} | 86.5        40"
            "                0    / 0             |"
        )
        rows.append(
            "| 0                         | 0000:C1:00.0  | 0           0    / 0"
            "          0 / 32768            |"
        )
    return "\n".join(rows)


def test_an_answer_is_judged_with_the_checks_and_messages_of_validation() -> None:
    n = node("n1", hostname="atlas-7")
    good = agents.verdict(n, ok_answer(), NOW)
    assert good.ok and good.npus == frozenset(range(8))
    bad = agents.verdict(n, no_runtime_answer(), NOW)
    assert not bad.ok
    assert "Ascend Docker Runtime is not the default runtime on node atlas-7" in bad.summary()
    health = agents.health(n, ok_answer(table=npu_table({3})), NOW)
    assert not health.error and not health.npus[3].healthy and health.npus[0].healthy
    assert agents.health(n, no_runtime_answer(), NOW).error.startswith("no npu-smi table")
    assert agents.unreachable(n, "timed out", NOW).error == "agent unreachable: timed out"


class Agents:
    """Agents that answer from a dict (node id -> document; absent: unreachable)."""

    def __init__(self) -> None:
        self.documents: dict[str, dict[str, Any]] = {}
        self.reads = 0

    def read(
        self, nodes: Sequence[NodeInfo], paths: Mapping[str, Sequence[str]] | None = None
    ) -> dict[str, Answer]:
        self.reads += len(nodes)
        self.paths = dict(paths or {})
        return {
            n.id: Answer(self.documents[n.id])
            if n.id in self.documents
            else Answer(None, "connection refused")
            for n in nodes
        }

    def forget(self, keep: set[str]) -> None:
        pass

    def close(self) -> None:
        pass


def checker_for(
    swarm: MemorySwarm, reconciler: Reconciler, settings: Settings, clock: Any = lambda: NOW
) -> tuple[NodeChecker, Agents]:
    fake = Agents()
    checker = NodeChecker(
        swarm,
        settings,
        lambda: reconciler.last_plan,
        CREDENTIALS,
        clock=clock,
        reader=fake,  # type: ignore[arg-type]
    )
    return checker, fake


SETTINGS = Settings(agent_image="npuswarm:1", root_key=ROOT)


def test_agents_are_started_once_stale_probes_removed_and_steady_state_writes_nothing() -> None:
    swarm = MemorySwarm(nodes=2, npus=8)
    stale = {"Name": "npuswarm-probe-old", "Labels": {node_checks.CHECK: "default"}}
    stale_reading = {"Name": "npuswarm-health-old", "Labels": {npusmi.READING: "default"}}
    swarm.add_service(stale)
    swarm.add_service(stale_reading)
    reconciler = Reconciler(swarm, SETTINGS, clock=lambda: NOW)
    checker, fake = checker_for(swarm, reconciler, SETTINGS)
    reconciler.run_pass(Desired(deployments=[]), checker.unusable)
    checker.step()
    names = sorted(s["Spec"]["Name"] for s in swarm.services.values())
    assert names == ["npuswarm-agent-default-0-7"], "one agent service; probes of before gone"
    assert {n["Spec"]["Labels"][agents.NODE_LABEL] for n in swarm.nodes} == {"0-7"}
    assert len(swarm.secrets) == 2

    fake.documents = {"node1": ok_answer(), "node2": ok_answer()}
    before = sum(swarm.calls.values())
    writes = swarm.writes() + swarm.calls["update_node"] + swarm.calls["create_secret"]
    reconciler.run_pass(Desired(deployments=[]), checker.unusable)
    for _ in range(5):
        checker.step()
    assert swarm.writes() + swarm.calls["update_node"] + swarm.calls["create_secret"] == writes
    assert sum(swarm.calls.values()) - before == 4, "only the pass's four list calls"
    assert checker.agents_up() == [("host1", True), ("host2", True)]


def test_a_label_written_is_not_written_again_until_a_snapshot_shows_it_gone() -> None:
    """The node event of the agents' label writes asks for no pass (runtime/swarm_watch.py),
    so steps in between still see the old snapshot: they must not write every label again
    (at 1,000 nodes that was 2,000 manager calls a second). A label removed by hand, once a
    pass has seen it gone, is put back."""
    swarm = MemorySwarm(nodes=2, npus=8)
    reconciler = Reconciler(swarm, SETTINGS, clock=lambda: NOW)
    checker, _ = checker_for(swarm, reconciler, SETTINGS)
    reconciler.run_pass(Desired(deployments=[]), checker.unusable)
    checker.step()
    assert swarm.calls["update_node"] == 2
    for _ in range(3):
        checker.step()  # no pass since: the snapshot still shows no label
    assert swarm.calls["update_node"] == 2

    reconciler.run_pass(Desired(deployments=[]), checker.unusable)
    del swarm.nodes[0]["Spec"]["Labels"][agents.NODE_LABEL]  # by hand
    reconciler.run_pass(Desired(deployments=[]), checker.unusable)
    checker.step()
    assert swarm.calls["update_node"] == 3
    assert {n["Spec"]["Labels"][agents.NODE_LABEL] for n in swarm.nodes} == {"0-7"}


def test_an_unchanged_answer_is_not_judged_again_but_carries_the_new_time() -> None:
    """A 304 gives back the agent's last document: its verdict and readings are reused with
    the time of this reading; a different document (or a changed node) is judged anew."""
    swarm = MemorySwarm(nodes=1, npus=8)
    reconciler = Reconciler(swarm, SETTINGS, clock=lambda: NOW)
    times = [NOW]
    checker, fake = checker_for(swarm, reconciler, SETTINGS, clock=lambda: times[-1])
    reconciler.run_pass(Desired(deployments=[]), checker.unusable)
    fake.documents = {"node1": ok_answer()}
    checker.step()
    first = checker.verdicts()["node1"]
    times.append(NOW + timedelta(minutes=1))
    checker.read_now(agents.agent_nodes(swarm_nodes(reconciler)))
    again = checker.verdicts()["node1"]
    assert again.checked_at == times[-1] and checker.readings()["node1"].read_at == times[-1]
    assert again.checks is first.checks, "the same document: judged once"
    fake.documents = {"node1": no_runtime_answer()}
    checker.read_now(agents.agent_nodes(swarm_nodes(reconciler)))
    assert not checker.verdicts()["node1"].ok


def swarm_nodes(reconciler: Reconciler) -> list[NodeInfo]:
    plan = reconciler.last_plan
    assert plan is not None
    return plan.snapshot.nodes


def test_a_node_without_the_runtime_gets_no_replica_and_the_status_says_why() -> None:
    swarm = MemorySwarm(nodes=2, npus=8)
    reconciler = Reconciler(swarm, SETTINGS, clock=lambda: NOW)
    checker, fake = checker_for(swarm, reconciler, SETTINGS)
    md = deployment("qwen3", replicas=2, npusPerReplica=8)
    desired = Desired(deployments=[md])
    first = reconciler.run_pass(desired, checker.unusable)
    assert "is being validated" in first.views[md.key].status.replicaStatuses[0].message
    assert not swarm.by_name().get("default-qwen3-0")

    fake.documents = {"node1": ok_answer(), "node2": no_runtime_answer()}
    assert checker.step() == {"node1", "node2"}
    after = reconciler.run_pass(desired, checker.unusable)
    placed = {
        s["Spec"]["Labels"][labels.NODE]
        for s in swarm.services.values()
        if labels.NODE in s["Spec"]["Labels"]
    }
    assert placed == {"node1"}
    degraded = next(c for c in after.views[md.key].status.conditions if c.type == "Degraded")
    assert degraded.reason == "NodeValidationFailed"
    assert "Ascend Docker Runtime is not the default runtime on node host2" in degraded.message


def test_without_a_root_key_nodes_wait_and_say_what_is_missing() -> None:
    swarm = MemorySwarm(nodes=1, npus=8)
    settings = Settings(agent_image="npuswarm:1")
    reconciler = Reconciler(swarm, settings, clock=lambda: NOW)
    checker = NodeChecker(swarm, settings, lambda: reconciler.last_plan, None)
    md = deployment("qwen3")
    reconciler.run_pass(Desired(deployments=[md]), checker.unusable)
    checker.step()
    assert swarm.writes() == 0, "no agent without a credential"
    status = reconciler.run_pass(Desired(deployments=[md]), checker.unusable).views[md.key].status
    assert "NPUSWARM_ROOT_KEY" in status.replicaStatuses[0].message


def replica_of(swarm: MemorySwarm) -> tuple[str, str]:
    found = next(
        s["Spec"]["Labels"] for s in swarm.services.values() if labels.NPUS in s["Spec"]["Labels"]
    )
    return found[labels.NODE], found[labels.NPUS]


def test_unhealthy_npu_moves_its_replica_after_the_grace_an_unreachable_agent_moves_nothing() -> None:
    clock = [NOW]
    settings = Settings(
        agent_image="npuswarm:1",
        root_key=ROOT,
        npu_unhealthy_grace_seconds=60,
        npu_health_seconds=10,
    )
    swarm = MemorySwarm(nodes=2, npus=8)
    reconciler = Reconciler(swarm, settings, clock=lambda: clock[0])
    checker, fake = checker_for(swarm, reconciler, settings, clock=lambda: clock[0])
    fake.documents = {"node1": ok_answer(), "node2": ok_answer()}
    md = deployment("qwen3", replicas=1, npusPerReplica=4)
    desired = Desired(deployments=[md])

    def turn(seconds: float = 11) -> set[str]:
        clock[0] += timedelta(seconds=seconds)
        checker._read_at.clear()  # the reader's own interval is wall-clock time
        changed = checker.step()
        reconciler.run_pass(desired, checker.unusable)
        swarm.run_all()
        return changed

    reconciler.run_pass(desired, checker.unusable)
    turn()
    turn()
    where, npus = replica_of(swarm)
    bad = int(npus.split(",")[0])

    # The agent goes away: nothing moves, the node's health is unknown.
    del fake.documents[where]
    turn(100)
    assert dict(checker.agents_up())[f"host{where[-1]}"] is False
    assert replica_of(swarm) == (where, npus)

    fake.documents[where] = ok_answer(table=npu_table({bad}))
    turn()
    assert replica_of(swarm) == (where, npus), "within the grace the replica stays"
    assert where in turn(61), "the grace running out changes what is withheld"
    turn()
    moved = replica_of(swarm)
    assert moved != (where, npus)
    if moved[0] == where:
        assert bad not in {int(n) for n in moved[1].split(",")}

    fake.documents[where] = ok_answer()
    turn()
    assert not checker.unusable(reconciler.last_plan.snapshot).npus, "healthy again: usable"


def test_an_agent_serves_its_readings_under_npu_exporters_names() -> None:
    document = ok_answer(table=npu_table({3}))
    document["roce"] = {
        "present": True,
        "npus": {
            "3": {"link": "link status: DOWN\n", "net": "net health status: Fault\n"},
            "4": {"link": "link status: UP\n", "net": "net health status: Init\n"},
        },
    }
    text = generate_latest(exporter(document, "host1")).decode()
    labels_of = 'id="3",model_name="910B4",node="host1",pcie_bus_info="0000:C1:00.0"'
    assert f"npu_chip_info_health_status{{{labels_of}}} 0.0" in text
    assert 'npu_chip_info_health_status{id="0",' in text and "} 1.0" in text
    assert f"npu_chip_info_hbm_total_memory{{{labels_of}}} 32768.0" in text
    assert f"npu_chip_info_power{{{labels_of}}} 86.5" in text
    assert f"npu_chip_info_temperature{{{labels_of}}} 40.0" in text
    assert f"npu_chip_info_utilization{{{labels_of}}} 0.0" in text
    assert f"npu_chip_info_link_status{{{labels_of}}} 0.0" in text
    assert f"npu_chip_info_network_status{{{labels_of}}} 0.0" in text
    assert 'npu_chip_info_network_status{id="4",' in text
    assert 'npu_chip_info_link_status{id="0",' not in text, "no hccn_tool reading for NPU 0"


def test_roce_links_down_keep_multi_node_members_away_and_say_why() -> None:
    from npuswarm.nodehealth import roce

    assert roce.parse_link("link status: UP\n") == "UP"
    assert roce.parse_net_health("net health status: Socket failed\n") == "Socket failed"
    assert roce.links({"validation": {}}) is None, "no hccn_tool: nothing concluded"
    swarm = MemorySwarm(nodes=2, npus=8)
    reconciler = Reconciler(swarm, SETTINGS, clock=lambda: NOW)
    checker, fake = checker_for(swarm, reconciler, SETTINGS)
    down = ok_answer()
    down["roce"] = {
        "present": True,
        "npus": {
            str(n): {
                "link": f"link status: {'DOWN' if n == 2 else 'UP'}",
                "net": "net health status: Success",
            }
            for n in range(8)
        },
    }
    fake.documents = {"node1": down, "node2": ok_answer()}
    reconciler.run_pass(Desired(deployments=[]), checker.unusable)
    checker.step()
    limits = checker.unusable(reconciler.last_plan.snapshot)
    assert limits.roce == {
        "node1": "RoCE on node host1: NPU 2 link DOWN, net health Success (hccn_tool)"
    }
    nodes = {n.id: n for n in limits.apply(reconciler.last_plan.snapshot.nodes)}
    assert nodes["node1"].roce_problem.startswith("RoCE on node host1: NPU 2 link DOWN")
    assert nodes["node2"].roce_problem == "" and nodes["node1"].accepts_new_replicas


def test_a_refused_agent_write_still_reads_the_agents_that_run_and_is_tried_again() -> None:
    swarm = MemorySwarm(nodes=1, npus=8)
    swarm.refuse["npuswarm-agent-default-0-7"] = "image not allowed"
    reconciler = Reconciler(swarm, SETTINGS, clock=lambda: NOW)
    checker, fake = checker_for(swarm, reconciler, SETTINGS)
    fake.documents = {"node1": ok_answer()}
    reconciler.run_pass(Desired(deployments=[]), checker.unusable)
    checker.step()
    assert checker.verdicts()["node1"].ok, "the agent that runs is read anyway"
    assert swarm.services == {}
    del swarm.refuse["npuswarm-agent-default-0-7"]
    checker.step()
    assert [s["Spec"]["Name"] for s in swarm.services.values()] == ["npuswarm-agent-default-0-7"]


def test_nodes_validate_reads_the_agents_and_writes_nothing_to_swarm() -> None:
    """Issue 25, item 6: `npuswarm nodes --validate` used to start one-shot probe services
    holding every node's NPUs and remove them at its end, so an interrupted run left them
    holding NPUs. It now only reads the node agents: nothing to leave behind."""
    swarm = MemorySwarm(nodes=2, npus=8)
    for node in swarm.nodes:
        node["Status"]["Addr"] = ""  # no address to read an agent at: answers nothing
    readout = read_agents(swarm, SETTINGS)
    assert swarm.writes() == 0 and swarm.calls["update_node"] == 0
    assert swarm.calls["create_secret"] == 0 and swarm.secrets == {}
    assert all("agent unreachable" in (reading.error or "") for reading in readout.health.values())
    assert set(readout.health) == {"node1", "node2"} and readout.roce == {}
    assert set(readout.verdicts) <= {n["ID"] for n in swarm.nodes}


def test_the_loop_steps_every_second_only_while_agents_come_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh start used to wait a poll interval before writing the agents and another
    before reading them (about 10 s before the first replica could be placed on a fleet)."""
    from npuswarm.nodehealth import runner

    swarm = MemorySwarm(nodes=2, npus=8)
    reconciler = Reconciler(swarm, SETTINGS, clock=lambda: NOW)
    checker, fake = checker_for(swarm, reconciler, SETTINGS)
    assert checker.settling(), "no pass yet"
    reconciler.run_pass(Desired(deployments=[]), checker.unusable)
    checker.step()  # writes the agents; none answers yet
    assert checker.settling()
    fake.documents = {"node1": ok_answer()}
    checker.step()
    assert checker.settling(), "node2 has no verdict yet"
    fake.documents["node2"] = ok_answer()
    checker.step()
    assert not checker.settling()

    late = Reconciler(swarm, SETTINGS, clock=lambda: NOW)
    silent, _ = checker_for(swarm, late, SETTINGS)
    late.run_pass(Desired(deployments=[]), silent.unusable)
    silent.step()
    assert silent.settling()
    monkeypatch.setattr(runner, "SETTLE_SECONDS", 0.0)
    assert not silent.settling(), "an agent that never answers is read at the normal interval"


def test_the_loop_wakes_when_an_unhealthy_npus_grace_ends() -> None:
    """A replica on an NPU read unhealthy moves when the grace ends, not up to a poll later."""
    swarm = MemorySwarm(nodes=1, npus=8)
    reconciler = Reconciler(swarm, SETTINGS, clock=lambda: NOW)
    checker, _ = checker_for(swarm, reconciler, SETTINGS)
    assert checker.next_grace_end() is None
    grace = SETTINGS.npu_unhealthy_grace_seconds
    checker.since = {("node1", 3): NOW - timedelta(seconds=grace - 20), ("node1", 4): NOW - timedelta(seconds=grace + 5)}
    assert checker.next_grace_end() == 20.0, "the soonest grace still to end; an ended one is past"


def exporter(document: dict[str, Any], node: str) -> CollectorRegistry:
    """What ``GET /metrics`` of the agent on ``node`` serves after reading ``document``."""
    state = agent.AgentState()
    state.update(document)
    return agent.exporter(state, node)
