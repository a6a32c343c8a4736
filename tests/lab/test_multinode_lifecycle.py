"""Multi-node replicas live and die together, on the lab (issue 20 items 4 and 6): a member that
dies takes its group down and npuswarm restarts every member; a member's node killed moves
that member and restarts the group on the remaining nodes; a group that needs more nodes than
are free holds nothing while a single-node deployment beside it gets its place; a rolling
update of two groups replaces one group at a time. The Reconciler runs as the operator runs
it, and no NPU is held by two tasks at any pass (tests/invariants.py)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

import swarmlab
from npuswarm.api.deployment import ModelDeployment
from npuswarm.core.pipeline import DeploymentView, Desired
from npuswarm.reconcile import PassResult, Reconciler
from npuswarm.swarm import Swarm
from tests.helpers import wait_for
from tests.invariants import npu_conflicts

from .conftest import lab_settings, service_container

pytestmark = pytest.mark.lab

OWNED = "npuswarm.io/managed-by=npuswarm"


def group_model(name: str, created: str = "2026-01-05T00:00:00Z", generation: int = 1,
                **spec: Any) -> ModelDeployment:
    body = {"image": swarmlab.IMAGE, "model": f"/models/{name}", "nodesPerReplica": 2,
            "npusPerReplica": 8, "engine": {"tensorParallelSize": 4, "dataParallelSize": 4},
            "healthCheck": {"startPeriodSeconds": 30, "intervalSeconds": 1, "timeoutSeconds": 2}}
    for key, value in spec.items():
        body[key] = {**body[key], **value} if isinstance(body.get(key), dict) else value
    return ModelDeployment.model_validate({
        "metadata": {"name": name, "namespace": "lab", "uid": f"uid-{name}", "generation": generation,
                     "creationTimestamp": created},
        "spec": body,
    })


class Operator:
    """Passes over a set of deployments, as the operator runs them, checking after every pass
    that no NPU is held by two live tasks (npuswarm's or anyone's)."""

    def __init__(self, lab: swarmlab.Lab, *deployments: ModelDeployment, **settings: Any) -> None:
        options = {"lost_node_grace_seconds": 5, "stop_grace_seconds": 5,
                   "failing_replica_backoff_seconds": 5} | settings
        self.lab = lab
        self.reconciler = Reconciler(Swarm(base_url=lab.endpoint), lab_settings(**options))
        self.deployments = list(deployments)
        self.previous: dict[str, dict[str, Any]] = {}
        self.conflicts: list[str] = []
        self.last: PassResult | None = None

    def run(self) -> PassResult:
        result = self.reconciler.run_pass(Desired(deployments=self.deployments, previous=self.previous))
        self.previous = {k: v.status.model_dump(mode="json") for k, v in result.views.items()}
        self.conflicts += npu_conflicts(self.lab.client(1).api)
        self.last = result
        return result

    def until(self, condition: Callable[[PassResult], Any], what: str, timeout: float = 180) -> PassResult:
        def met() -> PassResult | None:
            result = self.run()
            return result if condition(result) else None

        return wait_for(met, what, timeout=timeout, interval=0.5)

    def view(self, md: ModelDeployment) -> DeploymentView:
        assert self.last is not None
        return self.last.views[md.key]

    def finalize(self) -> None:
        for md in self.deployments:
            self.reconciler.finalize(md.metadata.namespace, md.metadata.name, md.metadata.uid)
        api = self.lab.client(1).api
        wait_for(lambda: not api.services(filters={"label": OWNED}), "the test's services to go", timeout=60)


def ready(md: ModelDeployment) -> Callable[[PassResult], bool]:
    return lambda r: r.views[md.key].status.phase == "Ready"


def index_of(lab: swarmlab.Lab, hostname: str | None) -> int:
    return next(i for i in range(1, len(lab.nodes) + 1) if lab.node(i).hostname == hostname)


def members(view: DeploymentView, group: str = "0") -> dict[str, Any]:
    found = next(g for g in view.status.groupStatuses if g.group == group)
    return {m.replica: m for m in found.members}


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def test_a_member_that_dies_takes_its_group_down_and_every_member_restarts(
    swarm_lab: swarmlab.Lab,
) -> None:
    md = group_model("ds-die")
    operator = Operator(swarm_lab, md)
    try:
        first = operator.until(ready(md), "the group to be Ready").views[md.key]
        rows = members(first)
        before = {slot: service_container(swarm_lab, row.service).id for slot, row in rows.items()}
        # The headless member's container dies (as an engine crash does).
        service_container(swarm_lab, rows["0-m1"].service).kill()
        restarted = operator.until(
            lambda r: r.views[md.key].status.groupStatuses[0].state == "Restarting",
            "npuswarm to restart the whole group")
        reasons = {a.slot: a.reason for a in restarted.views[md.key].applied}
        assert set(reasons) == {"0-m0", "0-m1"}, reasons
        assert all(reason.startswith("group restart: member 0-m") for reason in reasons.values())
        again = operator.until(ready(md), "the group to be Ready again").views[md.key]
        group = again.status.groupStatuses[0]
        assert (group.state, group.generation, again.status.readyReplicas) == ("Ready", 1, 1)
        after = {slot: service_container(swarm_lab, row.service).id for slot, row in members(again).items()}
        # Every member runs in a new container, the leader too: nobody was restarted alone.
        assert all(after[slot] != before[slot] for slot in before)
        leader = swarm_lab.node(index_of(swarm_lab, members(again)["0-m0"].hostname))
        formed = get(f"http://{leader.address}:{again.status.endpoint.rsplit(':', 1)[1]}/fake/group")
        assert formed["complete"] is True and len(formed["members"]) == 2
        assert operator.conflicts == []
    finally:
        operator.finalize()


def test_a_member_node_killed_moves_the_member_and_restarts_the_group_on_the_remaining_nodes(
    swarm_lab: swarmlab.Lab,
) -> None:
    md = group_model("ds-lost")
    operator = Operator(swarm_lab, md)
    victim: int | None = None
    try:
        first = operator.until(ready(md), "the group to be Ready").views[md.key]
        rows = members(first)
        used = {slot: index_of(swarm_lab, row.hostname) for slot, row in rows.items()}
        # The manager (node 1) keeps the Swarm: a worker node of the group dies.
        slot, victim = next((s, i) for s, i in sorted(used.items(), key=lambda item: -item[1]) if i != 1)
        spare = ({1, 2, 3} - set(used.values())).pop()
        swarm_lab.kill_dockerd(victim)
        again = operator.until(
            lambda r: ready(md)(r) and r.views[md.key].status.groupStatuses[0].generation >= 1,
            "the group to be Ready on the remaining nodes", timeout=240).views[md.key]
        now = {s: index_of(swarm_lab, row.hostname) for s, row in members(again).items()}
        assert victim not in now.values() and now[slot] == spare
        assert [s for s in now if s != slot] == [s for s in used if s != slot]
        assert now[next(s for s in now if s != slot)] == used[next(s for s in used if s != slot)]
        leader = swarm_lab.node(now["0-m0"])
        formed = get(f"http://{leader.address}:{again.status.endpoint.rsplit(':', 1)[1]}/fake/group")
        assert formed["complete"] is True
        assert {m["address"] for m in formed["members"]} == {swarm_lab.node(i).address for i in now.values()}
        assert operator.conflicts == []
    finally:
        if victim is not None:
            swarm_lab.start_dockerd(victim)
            swarm_lab.wait_node_state(victim, "ready", timeout=60)
        operator.finalize()


def test_a_group_that_needs_more_nodes_than_are_free_holds_nothing_and_a_replica_beside_it_runs(
    swarm_lab: swarmlab.Lab,
) -> None:
    # An older single-node replica holds half of one node: only two nodes have 8 NPUs free.
    hog = group_model("hog", created="2026-01-04T00:00:00Z", nodesPerReplica=1, npusPerReplica=4,
                      engine={"tensorParallelSize": 4, "dataParallelSize": None, "port": 8000})
    big = group_model("big", created="2026-01-05T00:00:00Z", nodesPerReplica=3,
                      engine={"dataParallelSize": 6})
    small = group_model("small", created="2026-01-06T00:00:00Z", nodesPerReplica=1, npusPerReplica=4,
                        engine={"tensorParallelSize": 4, "dataParallelSize": None, "port": 8001})
    operator = Operator(swarm_lab, hog)
    try:
        operator.until(ready(hog), "the older replica to be Ready")
        # The group (older) and the single-node deployment are applied at once.
        operator.deployments = [hog, big, small]
        api = swarm_lab.client(1).api
        held: list[str] = []

        def small_ready(result: PassResult) -> bool:
            held.extend(s["Spec"]["Name"] for s in api.services(filters={"label": "npuswarm.io/owner-name=big"}))
            return ready(small)(result)

        result = operator.until(small_ready, "the single-node deployment to be Ready")
        for _ in range(3):  # and it stays so: the group never takes a member's place
            result = operator.run()
            small_ready(result)
        assert held == []
        status = result.views[big.key].status
        assert (status.placedReplicas, status.npus, status.groupStatuses[0].state) == (0, 0, "Pending")
        assert "needs 3 of 3 node(s) with 8 free NPUs each; 2 fit" in (status.groupStatuses[0].message or "")
        assert result.views[small.key].status.readyReplicas == 1
        assert operator.conflicts == []
    finally:
        operator.finalize()


def test_a_rolling_update_of_two_groups_replaces_one_group_at_a_time(swarm_lab: swarmlab.Lab) -> None:
    shape = {"replicas": 2, "npusPerReplica": 4, "engine": {"tensorParallelSize": 4, "dataParallelSize": 2}}
    md = group_model("ds-roll", **shape)
    operator = Operator(swarm_lab, md)
    try:
        operator.until(ready(md), "both groups to be Ready")
        new = group_model("ds-roll", generation=2, **{**shape, "engine": {**shape["engine"], "env": {"ROLLOUT": "2"}}})
        operator.deployments = [new]
        seen: list[tuple[str, ...]] = []  # per pass: the groups not serving (a member not running)
        written: list[set[str]] = []  # per pass: the groups whose members were written

        def done(result: PassResult) -> bool:
            view = result.views[new.key]
            # "ready" in the status means running the new spec; serving is running at all.
            seen.append(tuple(g.group for g in view.status.groupStatuses
                              if any(m.taskState != "running" for m in g.members)))
            written.append({a.slot.split("-m")[0] for a in view.applied})
            return view.status.phase == "Ready" and view.status.observedGeneration == 2

        operator.until(done, "the update to roll through both groups", timeout=240)
        assert all(len(down) <= 1 for down in seen), seen
        assert {"0"} in [set(down) for down in seen] and {"1"} in [set(down) for down in seen], seen
        order = [groups for groups in written if groups]
        assert order == [{"0"}, {"1"}], order
        api = swarm_lab.client(1).api
        envs = [s["Spec"]["TaskTemplate"]["ContainerSpec"]["Env"] for s in
                api.services(filters={"label": "npuswarm.io/owner-name=ds-roll"})]
        assert len(envs) == 4 and all("ROLLOUT=2" in env for env in envs)
        assert operator.conflicts == []
    finally:
        operator.finalize()
