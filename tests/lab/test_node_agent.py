"""The node agent on the multi-node lab: the operator's image, loaded into every lab node, runs
as one global service per NPU set; the operator's checker reads each agent on its node's
address over TLS (host-mode port) with signed requests, as it does from outside the nodes'
network in production. The pass and the checker run here as the operator's loops run them.

A node without the runtime is reported and gets no replica until fixed; an NPU turning
unhealthy moves its replica after the grace and is back when healthy; an agent killed by hand
is restarted by Swarm and nothing moves meanwhile; no NPU is ever held twice."""

from __future__ import annotations

import io
import time
from contextlib import redirect_stdout
from typing import Any

import pytest
from prometheus_client import generate_latest

import swarmlab
from npuswarm import cli, metrics
from npuswarm.api.deployment import ModelDeployment
from npuswarm.core.pipeline import Desired
from npuswarm.gateway import protocol
from npuswarm.gateway.credentials import Credentials
from npuswarm.nodehealth import agents
from npuswarm.nodehealth.runner import NodeChecker, publish_verdicts
from npuswarm.reconcile import PassResult, Reconciler
from npuswarm.settings import Settings
from npuswarm.swarm import Swarm
from tests.helpers import wait_for
from tests.invariants import npu_conflicts

pytestmark = pytest.mark.lab

from .conftest import ROOT_KEY, agent_settings
GRACE = 3.0


@pytest.fixture
def settings(operator_image: str) -> Settings:
    return agent_settings(operator_image, GRACE)


def body(name: str, replicas: int, npus: int = 8) -> dict[str, Any]:
    """A deployment of ``replicas`` x ``npus`` NPUs, as kubectl would send it."""
    return {
        "metadata": {
            "name": name,
            "namespace": "lab",
            "uid": f"uid-{name}",
            "generation": 1,
            "creationTimestamp": "2026-12-01T00:00:00Z",
        },
        "spec": {
            "image": swarmlab.IMAGE,
            "model": f"/models/{name}",
            "mode": "Replicated",
            "replicas": replicas,
            "npusPerReplica": npus,
            "healthCheck": {"startPeriodSeconds": 20, "intervalSeconds": 1, "timeoutSeconds": 2},
            "restartPolicy": {"delaySeconds": 1},
        },
    }


def model(name: str, replicas: int, npus: int = 8) -> ModelDeployment:
    return ModelDeployment.model_validate(body(name, replicas, npus))


class Loops:
    """The operator's pass and node-check loops, stepped by the test; every turn checks that
    no NPU is held twice."""

    def __init__(self, lab: swarmlab.Lab, settings: Settings, md: ModelDeployment) -> None:
        self.lab = lab
        self.swarm = Swarm(base_url=lab.endpoint)
        self.reconciler = Reconciler(self.swarm, settings)
        self.checker = NodeChecker(
            self.swarm,
            settings,
            lambda: self.reconciler.last_plan,
            Credentials(ROOT_KEY, settings.instance),
        )
        self.md = md
        self.previous: dict[str, Any] = {}
        self.last: PassResult | None = None

    def turn(self) -> PassResult:
        self.checker.step()
        result = self.reconciler.run_pass(
            Desired(deployments=[self.md], previous={self.md.key: self.previous}),
            self.checker.unusable,
        )
        self.previous = result.views[self.md.key].status.model_dump(mode="json")
        self.last = result
        conflicts = npu_conflicts(self.lab.client(1).api)
        assert not conflicts, conflicts
        return result

    def replicas(self) -> dict[str, tuple[str, frozenset[int]]]:
        """slot -> (node id, NPUs) of the replicas the last pass saw."""
        found = {}
        for service in self.last.plan.snapshot.services_of(self.md.key) if self.last else []:
            allocation = service.allocation()
            if allocation is not None:
                found[service.slot] = (allocation.node_id, allocation.npus)
        return found

    def close(self) -> None:
        self.checker.close()
        self.reconciler.finalize(
            self.md.metadata.namespace, self.md.metadata.name, self.md.metadata.uid
        )
        self.reconciler.close()


def agent_container(lab: swarmlab.Lab, index: int) -> dict[str, Any] | None:
    for container in lab.client(index).api.containers(
        filters={"label": "com.docker.swarm.service.name"}
    ):
        if container["Labels"]["com.docker.swarm.service.name"].startswith("npuswarm-agent"):
            return container
    return None


@pytest.mark.usefixtures("agents_removed")
def test_a_node_without_the_runtime_gets_no_replica_is_reported_and_is_used_once_fixed(
    swarm_lab: swarmlab.Lab, settings: Settings
) -> None:
    broken = 3
    broken_id, broken_host = swarm_lab.node_id(broken), swarm_lab.node(broken).hostname
    swarm_lab.set_runtime_installed(broken, False)
    loops = Loops(swarm_lab, settings, model("validated", replicas=3))
    publish_verdicts(loops.checker)
    try:
        started = time.monotonic()

        def all_judged() -> bool:
            loops.turn()
            return len(loops.checker.verdicts()) == 3

        wait_for(all_judged, "a verdict from every node's agent", timeout=120, interval=0.5)
        judged_after = time.monotonic() - started
        verdicts = loops.checker.verdicts()
        assert not verdicts[broken_id].ok
        assert all(v.ok for k, v in verdicts.items() if k != broken_id), verdicts
        services = swarm_lab.client(1).api.services(filters={"label": agents.AGENT})
        assert [s["Spec"]["Name"] for s in services] == ["npuswarm-agent-default-0-7"]

        # The validated nodes take a replica each within a few turns (their agents are also
        # asked about the model's host path first); the broken node never does.
        def two_placed() -> bool:
            loops.turn()
            return len(loops.replicas()) >= 2

        wait_for(two_placed, "replicas on the two validated nodes", timeout=60, interval=0.5)
        result = loops.turn()
        placed = {node for node, _ in loops.replicas().values()}
        assert broken_id not in placed and len(loops.replicas()) == 2, loops.replicas()
        status = result.views[loops.md.key].status
        degraded = next(c for c in status.conditions if c.type == "Degraded")
        wanted = f"Ascend Docker Runtime is not the default runtime on node {broken_host}"
        assert degraded.reason == "NodeValidationFailed" and wanted in degraded.message, degraded
        scraped = generate_latest(metrics.REGISTRY).decode()
        assert f'npuswarm_node_validation{{check="runtime",node="{broken_host}"}} 0.0' in scraped
        assert f'npuswarm_node_agent_up{{node="{broken_host}"}} 1.0' in scraped

        # `npuswarm nodes --validate` reads the agents and says the same. The failed node's
        # agent exits every node_recheck_failed_seconds for a new container (3 s here), so a
        # one-off read can fall between two containers: read until one answers.
        def validated() -> str | None:
            out = io.StringIO()
            with pytest.MonkeyPatch.context() as patch, redirect_stdout(out):
                patch.setenv("DOCKER_HOST", swarm_lab.endpoint)
                patch.setenv("NPUSWARM_ROOT_KEY", ROOT_KEY)
                code = cli.main(["nodes", "--validate"])
            return out.getvalue() if code == 1 and wanted in out.getvalue() else None

        wait_for(validated, "`npuswarm nodes --validate` naming the failed check", 30, 0.5)

        # Fixed: the failed agent's next container sees the runtime, the third replica goes.
        swarm_lab.set_runtime_installed(broken, True)
        fixed = time.monotonic()

        def placed_on_fixed_node() -> bool:
            loops.turn()
            return broken_id in {node for node, _ in loops.replicas().values()}

        wait_for(placed_on_fixed_node, f"a replica on {broken_host}", timeout=90, interval=0.5)
        used_after = time.monotonic() - fixed
        print(
            f"verdicts for 3 nodes in {judged_after:.1f}s; fixed node used after {used_after:.1f}s"
        )
    finally:
        swarm_lab.set_runtime_installed(broken, True)
        loops.close()
        publish_verdicts(None)


@pytest.mark.usefixtures("agents_removed")
def test_an_unhealthy_npu_moves_its_replica_and_an_agent_killed_by_hand_moves_nothing(
    swarm_lab: swarmlab.Lab, settings: Settings
) -> None:
    index_of = {swarm_lab.node_id(k): k for k in (1, 2, 3)}
    loops = Loops(swarm_lab, settings, model("healthy", replicas=1, npus=4))
    publish_verdicts(loops.checker)
    touched: list[int] = []
    try:

        def placed_and_read() -> bool:
            loops.turn()
            replica = loops.replicas().get("0")
            return replica is not None and replica[0] in loops.checker.readings()

        wait_for(placed_and_read, "the replica placed, its node read", timeout=120, interval=0.5)
        where, npus = loops.replicas()["0"]
        k = index_of[where]

        # The agent killed by hand: Swarm starts a new one; health unknown, nothing moves.
        before = agent_container(swarm_lab, k)
        assert before is not None
        swarm_lab.client(k).api.kill(before["Id"])
        seen_down = False

        def restarted() -> bool:
            nonlocal seen_down
            loops.turn()
            assert loops.replicas()["0"] == (where, npus), "nothing moves for an unknown node"
            up = dict(loops.checker.agents_up())[swarm_lab.node(k).hostname]
            seen_down = seen_down or not up
            now = agent_container(swarm_lab, k)
            return seen_down and up and now is not None and now["Id"] != before["Id"]

        wait_for(restarted, "a new agent container answering", timeout=60, interval=0.3)
        assert loops.checker.verdicts()[where].ok

        # One NPU of the replica turns Critical: it moves after the grace.
        bad = min(npus)
        touched.append(k)
        swarm_lab.set_npu_state(k, {bad: {"health": "Critical"}})
        turned = time.monotonic()

        def moved() -> bool:
            loops.turn()
            now_at = loops.replicas().get("0")
            return now_at is not None and now_at != (where, npus)

        wait_for(moved, "the replica off the unhealthy NPU", timeout=60, interval=0.3)
        moved_after = time.monotonic() - turned
        assert moved_after >= GRACE
        new_node, new_npus = loops.replicas()["0"]
        assert new_node != where or bad not in new_npus
        assert bad in loops.checker.unusable(loops.last.plan.snapshot).npus[where]

        # Healthy again: the NPU is back in the pool.
        swarm_lab.set_npu_state(k, {})
        healed = time.monotonic()

        def back() -> bool:
            loops.turn()
            return where not in loops.checker.unusable(loops.last.plan.snapshot).npus

        wait_for(back, "the NPU back in the pool", timeout=30, interval=0.3)
        back_after = time.monotonic() - healed

        # A process npuswarm did not start on a free NPU: taken by someone else, and
        # `npuswarm nodes --validate` shows the agents' readings.
        other = next(n for n in index_of if n != loops.replicas()["0"][0])
        k2 = index_of[other]
        touched.append(k2)
        swarm_lab.set_npu_state(
            k2,
            {
                5: {"processes": [{"pid": 999, "name": "python3", "memory_mb": 9000}]},
                6: {"health": "Critical", "hbm_used_mb": 31000},
            },
        )

        def taken() -> str | None:
            loops.turn()
            return loops.checker.unusable(loops.last.plan.snapshot).busy.get(other, {}).get(5)

        why = wait_for(taken, "NPU 5 with a foreign process withheld", 30, 0.3)
        assert "runs processes npuswarm did not start (pid 999 python3)" in why
        out = io.StringIO()
        with pytest.MonkeyPatch.context() as patch, redirect_stdout(out):
            patch.setenv("DOCKER_HOST", swarm_lab.endpoint)
            patch.setenv("NPUSWARM_ROOT_KEY", ROOT_KEY)
            code = cli.main(["nodes", "--validate"])
        assert code == 0, out.getvalue()
        assert "davinci6" in out.getvalue() and "[Critical, HBM 31000/32768 MB" in out.getvalue()
        print(
            f"replica moved {moved_after:.1f}s after the NPU turned Critical (grace {GRACE}s); "
            f"NPU back {back_after:.1f}s after it read OK"
        )
    finally:
        for index in touched:
            swarm_lab.set_npu_state(index, {})
        loops.close()
        publish_verdicts(None)


def scrape_agent(address: str, settings: Settings) -> str:
    """``GET /metrics`` of a node's agent as Prometheus scrapes it: TLS, no signature."""
    context = Credentials(ROOT_KEY, settings.instance).client_context()
    connection = protocol.PinnedHTTPS(address, settings.agent_port, agents.IDENTITY.hostname,
                                      context, timeout=10)
    try:
        connection.request("GET", agents.METRICS_PATH)
        answer = connection.getresponse()
        assert answer.status == 200, answer.status
        return answer.read().decode()
    finally:
        connection.close()


@pytest.mark.usefixtures("agents_removed")
def test_a_roce_link_down_is_reported_and_keeps_multi_node_members_away(
    swarm_lab: swarmlab.Lab, settings: Settings
) -> None:
    k = 2
    node_id, host = swarm_lab.node_id(k), swarm_lab.node(k).hostname
    loops = Loops(swarm_lab, settings, model("roce", replicas=1, npus=4))
    publish_verdicts(loops.checker)
    try:

        def all_links_read() -> bool:
            loops.turn()
            links = loops.checker.roce_links()
            return len(links) == 3 and all(found for found in links.values())

        wait_for(all_links_read, "every node's RoCE links read", timeout=120, interval=0.5)
        assert loops.checker.unusable(loops.last.plan.snapshot).roce == {}

        swarm_lab.set_roce_state(k, {3: {"link": "DOWN"}})
        changed = time.monotonic()

        def reported() -> str | None:
            loops.turn()
            return loops.checker.unusable(loops.last.plan.snapshot).roce.get(node_id)

        why = wait_for(reported, f"RoCE down on {host} reported", timeout=60, interval=0.5)
        assert why.startswith(f"RoCE on node {host}: NPU 3 link DOWN"), why
        nodes = {n.id: n for n in loops.last.plan.snapshot.nodes}
        limited = loops.checker.unusable(loops.last.plan.snapshot).apply(list(nodes.values()))
        assert {n.id: n.roce_problem for n in limited}[node_id] == why
        # Prometheus' view: the node's own agent serves its NPUs' series, named after it.
        scraped = scrape_agent(nodes[node_id].addr, settings)
        (line,) = [line for line in scraped.splitlines()
                   if line.startswith(f'npu_chip_info_link_status{{id="3",model_name="910B4",node="{host}"')]
        assert line.endswith(" 0.0"), line
        print(f"RoCE link down reported {time.monotonic() - changed:.1f}s after it went down")
    finally:
        swarm_lab.set_roce_state(k, {})
        loops.close()
        publish_verdicts(None)
