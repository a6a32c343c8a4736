"""Issue 12, outages on the multi-node lab: the Swarm manager's dockerd killed in the middle of a
pass and started again, and a worker lost while no other node has free NPUs. Passes run as the
operator's pass loop runs them (tests/swarm/conftest.py `serve`: one pass over every
deployment, each fed its previous status), a failed pass retried like the loop's backoff does;
no Kubernetes here (the e2e outage tests cover the operator process with its API server).
The invariant checker (tests/invariants.py) judges every scenario.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest

import swarmlab
from npuswarm.api.deployment import ModelDeployment
from npuswarm.reconcile import PassResult, Reconciler
from npuswarm.core.pipeline import Desired
from npuswarm.swarm import Swarm, SwarmUnavailable
from tests import invariants
from tests.helpers import wait_for

from .conftest import lab_settings
from .test_npuswarm_on_lab import NETWORK, lab_model

pytestmark = pytest.mark.lab

GRACE_SECONDS = 8.0
POOL = {"npuswarm.test/outage": "workers"}


class Passes:
    """The operator's pass loop in miniature: every pass serves every deployment and keeps
    each one's status for the next; a pass Swarm refuses is counted and retried."""

    def __init__(self, reconciler: Reconciler, deployments: list[ModelDeployment]) -> None:
        self.reconciler = reconciler
        self.deployments = deployments
        self.previous: dict[str, dict[str, Any]] = {}
        self.failed = 0

    def run(self) -> PassResult | None:
        try:
            result = self.reconciler.run_pass(Desired(deployments=self.deployments, previous=self.previous))
        except SwarmUnavailable:
            self.failed += 1
            return None
        for key, view in result.views.items():
            self.previous[key] = view.status.model_dump(mode="json")
        return result

    def until(self, check: Any, what: str, timeout: float = 120.0) -> PassResult:
        last: list[PassResult] = []

        def attempt() -> PassResult | None:
            result = self.run()
            if result is not None:
                last[:] = [result]
            return result if result is not None and check(result) else None

        try:
            return wait_for(attempt, what, timeout=timeout, interval=0.5)
        except BaseException:
            if last:
                print("moved:", last[0].plan.placement.moved)
            for key, view in (last[0].views.items() if last else ()):
                print(key, view.status.phase, [(c.type, c.reason, c.message) for c in view.status.conditions
                                               if c.type == "Degraded"])
            raise


def ready(*keys: str) -> Any:
    return lambda result: all(result.views[k].status.phase == "Ready" for k in keys)


def condition(result: PassResult, key: str, kind: str) -> Any:
    return next(c for c in result.views[key].status.conditions if c.type == kind)


def services_of(api: Any, md: ModelDeployment) -> dict[str, tuple[str, int]]:
    listed = api.services(filters={"label": f"npuswarm.io/owner-name={md.metadata.name}"})
    return {s["Spec"]["Name"]: (s["ID"], s["Version"]["Index"]) for s in listed}


def running_tasks(api: Any, service_id: str) -> list[dict[str, Any]]:
    return [t for t in api.tasks(filters={"service": service_id})
            if t["Status"]["State"] in {"running", "starting", "preparing", "assigned", "accepted"}
            and t.get("DesiredState") == "running"]


def check_invariants(api: Any, what: str) -> None:
    found = invariants.npu_conflicts(api, "npuswarm.io/managed-by=npuswarm")
    services = api.services(filters={"label": "npuswarm.io/managed-by=npuswarm"})
    slots = Counter((s["Spec"]["Labels"].get("npuswarm.io/owner-name"),
                     s["Spec"]["Labels"].get("npuswarm.io/replica")) for s in services)
    found += [f"{owner} replica {slot} has {n} services" for (owner, slot), n in slots.items() if n > 1]
    assert not found, f"{what}: invariants violated:\n" + "\n".join(found)


@pytest.fixture
def workers(swarm_lab: swarmlab.Lab) -> Any:
    """Nodes 2 and 3 labelled as the pool these tests place on (the manager stays out)."""
    api = swarm_lab.client(1).api
    for index in (2, 3):
        node = swarm_lab.swarm_node(index)
        spec = dict(node["Spec"], Labels={**node["Spec"].get("Labels", {}), **POOL})
        api.update_node(node["ID"], node["Version"]["Index"], spec)
    return api


@pytest.fixture
def made(swarm_lab: swarmlab.Lab) -> Any:
    created: list[ModelDeployment] = []
    yield created
    reconciler = Reconciler(Swarm(base_url=swarm_lab.endpoint), lab_settings())
    for md in created:
        reconciler.finalize(md.metadata.namespace, md.metadata.name, md.metadata.uid)


class KillsTheManagerMidPass(Swarm):
    """Swarm as the operator sees it, except that the manager's dockerd is SIGKILLed right
    after the pass's first create was sent: the rest of the pass meets a dead manager."""

    def __init__(self, lab: swarmlab.Lab, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lab = lab
        self.armed = False

    def create_service(self, spec: dict[str, Any]) -> str:
        service_id = super().create_service(spec)
        if self.armed:
            self.armed = False
            self.lab.kill_dockerd(1)
        return service_id


def test_the_managers_dockerd_killed_mid_pass_and_restarted_converges_without_duplicates(
    swarm_lab: swarmlab.Lab, workers: Any, made: list[ModelDeployment]
) -> None:
    swarm = KillsTheManagerMidPass(swarm_lab, base_url=swarm_lab.endpoint, timeout=10)
    # One write at a time, so that the kill lands between two writes of the same pass.
    reconciler = Reconciler(swarm, lab_settings(lost_node_grace_seconds=600, write_concurrency=1))
    steady = lab_model("steady", "2026-01-01T00:00:00Z", NETWORK, npusPerReplica=1, nodeSelector=POOL)
    made.append(steady)
    passes = Passes(reconciler, [steady])
    passes.until(ready(steady.key), "steady Ready")
    api = workers
    steady_services = services_of(api, steady)

    wide = lab_model("wide", "2026-01-02T00:00:00Z", NETWORK, replicas=4, npusPerReplica=1, nodeSelector=POOL)
    made.append(wide)
    passes.deployments = [steady, wide]
    swarm.armed = True
    killed_at = time.monotonic()
    try:
        assert passes.run() is None, "the pass with the manager killed in it did not fail"
        # While the manager is gone every pass fails, and fails without removing anything.
        assert passes.run() is None
    finally:
        swarm_lab.start_dockerd(1)
    passes.until(ready(steady.key, wide.key), "both Ready after the manager came back", timeout=180)
    print(f"\nmanager dockerd killed mid-pass: {passes.failed} failed passes, converged "
          f"{time.monotonic() - killed_at:.1f} s after the kill")

    assert services_of(api, steady) == steady_services, "the untouched deployment was rewritten"
    wide_services = services_of(api, wide)
    assert sorted(wide_services) == [f"lab-wide-{i}" for i in range(4)]
    for name, (service_id, _) in wide_services.items():
        assert len(running_tasks(api, service_id)) == 1, f"{name} runs more than one task"
    check_invariants(api, "after the manager restart")


def test_a_lost_worker_with_no_free_npus_elsewhere_leaves_its_replicas_unplaced_and_disturbs_nothing(
    swarm_lab: swarmlab.Lab, workers: Any, made: list[ModelDeployment]
) -> None:
    reconciler = Reconciler(Swarm(base_url=swarm_lab.endpoint), lab_settings(lost_node_grace_seconds=GRACE_SECONDS))
    node3 = swarm_lab.node(3).hostname
    # node2 is full with `filler`; `victim` can only go to node3.
    filler = lab_model("filler", "2026-01-01T00:00:00Z", NETWORK, npusPerReplica=8,
                       engine={"tensorParallelSize": 8}, nodeSelector={**POOL, "npuswarm.test/only": "node2"})
    victim = lab_model("victim", "2026-01-02T00:00:00Z", NETWORK, replicas=2, npusPerReplica=4,
                       engine={"tensorParallelSize": 4}, nodeSelector=POOL)
    node = swarm_lab.swarm_node(2)
    workers.update_node(node["ID"], node["Version"]["Index"],
                        dict(node["Spec"], Labels={**node["Spec"]["Labels"], "npuswarm.test/only": "node2"}))
    made += [filler, victim]
    passes = Passes(reconciler, [filler, victim])
    first = passes.until(ready(filler.key, victim.key), "filler and victim Ready", timeout=180)
    assert {r.hostname for r in first.views[victim.key].status.replicaStatuses} == {node3}
    filler_services = services_of(workers, filler)

    swarm_lab.kill_dockerd(3)
    lost_at = time.monotonic()
    try:
        swarm_lab.wait_node_state(3, "down", 30)
        within = passes.until(
            lambda r: condition(r, victim.key, "Degraded").reason == "NodeUnavailable",
            "Degraded/NodeUnavailable while within the grace", timeout=30)
        degraded = condition(within, victim.key, "Degraded")
        assert node3 in degraded.message and f"{GRACE_SECONDS:g}s" in degraded.message
        assert within.views[victim.key].status.readyReplicas == 0

        after = passes.until(
            lambda r: condition(r, victim.key, "Degraded").reason == "InsufficientNPUs",
            "the replicas reported unplaced after the grace", timeout=60)
        moved_after = time.monotonic() - lost_at
        status = after.views[victim.key].status
        assert status.placedReplicas == 0
        for replica in status.replicaStatuses:
            assert f"left its place (node {node3} is down" in (replica.message or "")
            assert "needs 4 free NPUs on one node" in (replica.message or "")
        assert services_of(workers, filler) == filler_services, "the filler was disturbed"
        assert after.views[filler.key].status.phase == "Ready"
        print(f"\nnode3 lost: NodeUnavailable during the {GRACE_SECONDS:g} s grace, unplaced "
              f"{moved_after:.1f} s after the kill: {condition(after, victim.key, 'Degraded').message}")
    finally:
        swarm_lab.start_dockerd(3)
        swarm_lab.wait_node_state(3, "ready", 60)

    back = passes.until(ready(filler.key, victim.key), "victim Ready again on node3", timeout=180)
    assert {r.hostname for r in back.views[victim.key].status.replicaStatuses} == {node3}
    assert services_of(workers, filler) == filler_services
    for name, (service_id, _) in services_of(workers, victim).items():
        assert len(running_tasks(workers, service_id)) == 1, f"{name} runs twice after node3 returned"
    check_invariants(workers, "after node3 returned")
