"""Issue 25, item 4: pushes to gateways run outside the pass lock, each gateway replica backing
off on its own, and the order "a replica leaves every gateway before any write stops it" still
holds (gateway/push.py)."""

from __future__ import annotations

import threading
from typing import Any

from npuswarm import metrics
from npuswarm.api.deployment import ModelDeployment
from npuswarm.core.pipeline import Desired
from npuswarm.gateway.push import MAX_PUSH_BACKOFF_SECONDS, Gateways, PushTarget, push_backoff
from npuswarm.reconcile import Reconciler
from npuswarm.settings import Settings

from ..helpers import wait_for
from .builders import NOW
from .memswarm import MemorySwarm
from .test_gateway import CREDENTIALS, gateway, model, overlay_swarm, run_with_addresses


class Gate:
    """A push sender whose pushes to chosen admin addresses hang until released (a gateway
    whose admin port accepts the connection and never answers) or fail."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.hang: set[str] = set()
        self.fail: set[str] = set()
        self.log: list[tuple[str, Any]] = []
        self.lock = threading.Lock()

    def send(self, target: PushTarget, state: dict[str, Any]) -> None:
        address = target.replica.address
        with self.lock:
            self.log.append(("push", address, {m: len(u) for m, u in state["models"].items()}))
        if address in self.hang:
            self.released.wait()
        if address in self.fail:
            raise ConnectionRefusedError(f"{address}: connection refused")

    def pushes_to(self, address: str) -> int:
        with self.lock:
            return sum(1 for entry in self.log if entry[1] == address)


def served_by(gateway_name: str, md: ModelDeployment) -> ModelDeployment:
    metadata = md.metadata.model_copy(update={"labels": {"gw": gateway_name}})
    return md.model_copy(update={"metadata": metadata})


def two_gateways(swarm: MemorySwarm, gate: Gate) -> tuple[Reconciler, Gateways, Desired]:
    """Deployment a behind gateway "fast" (node 1) and b behind gateway "slow" (node 2), each
    with one running task; the pass log records every write."""
    swarm.nodes[0]["Status"]["Addr"] = "10.123.0.1"
    swarm.nodes[1]["Status"]["Addr"] = "10.123.0.2"
    gateways = Gateways("default", CREDENTIALS, send=gate.send)
    r = Reconciler(swarm, Settings(), clock=lambda: NOW, gateways=gateways)
    fast = gateway("fast", modelSelector={"matchLabels": {"gw": "fast"}}, adminPort=9001)
    slow = gateway("slow", modelSelector={"matchLabels": {"gw": "slow"}}, adminPort=9002, port=8001)
    a = served_by("fast", model("a", replicas=2))
    b = served_by("slow", model("b", replicas=1))
    desired = Desired(deployments=[a, b], gateways=[fast, slow])
    r.run_pass(desired)
    run_with_addresses(swarm)
    for node, name in (("node1", "default-fast-gateway"), ("node2", "default-slow-gateway")):
        (service,) = [s for s in swarm.services.values() if s["Spec"]["Name"] == name]
        swarm.tasks.append({
            "ID": f"task-{name}", "ServiceID": service["ID"], "NodeID": node,
            "DesiredState": "running", "CreatedAt": "2026-11-30T11:00:00Z",
            "Status": {"State": "running", "Timestamp": "2026-11-30T11:00:00Z"},
        })
    return r, gateways, desired


def a_scaled_down(desired: Desired) -> Desired:
    """Deployment a from 2 replicas to 1: a pass removes one replica's service."""
    return Desired(
        deployments=[served_by("fast", model("a", replicas=1)), desired.deployments[1]],
        gateways=desired.gateways,
    )


def recorded_writes(swarm: MemorySwarm, log: list[tuple[str, Any]], lock: threading.Lock) -> None:
    updates, removals = swarm.update_service, swarm.remove_service

    def update(service_id: str, version: int, spec: dict[str, Any]) -> None:
        with lock:
            log.append(("update", spec["Name"]))
        updates(service_id, version, spec)

    def remove(service_id: str) -> None:
        with lock:
            log.append(("remove", swarm.services[service_id]["Spec"]["Name"]))
        removals(service_id)

    swarm.update_service = update  # type: ignore[method-assign]
    swarm.remove_service = remove  # type: ignore[method-assign]


def test_a_gateway_whose_admin_port_never_answers_holds_up_no_pass_and_no_lock() -> None:
    """Before: every pass waited on every push (8 at a time, 5 s each), inside the pass lock
    that finalizers and node checks also take; here the slow gateway's push never ends."""
    swarm = overlay_swarm(nodes=2)
    gate = Gate()
    gate.hang.add("10.123.0.2")
    r, gateways, desired = two_gateways(swarm, gate)
    try:
        finished = threading.Event()
        thread = threading.Thread(target=lambda: (r.run_pass(desired), finished.set()))
        thread.start()
        wait_for(finished.is_set, "a pass while the slow gateway's push hangs", timeout=10)
        wait_for(lambda: gate.pushes_to("10.123.0.2") == 1, "the slow gateway is being pushed to")
        assert r.lock.acquire(timeout=5), "the pass lock is free while a push hangs"
        r.lock.release()
        # The other gateway got its state meanwhile; a pass changing a goes on as usual.
        wait_for(lambda: gate.pushes_to("10.123.0.1") == 1, "the fast gateway got its state")
        changed = a_scaled_down(desired)
        held = r.run_pass(changed)
        assert not held.views["default/a"].applied, "the fast gateway still lists the replica"
        wait_for(lambda: gate.pushes_to("10.123.0.1") == 2, "the fast gateway dropped a replica")
        assert gateways.pusher is not None and gateways.pusher.settle(0.0) is False
        done = wait_for(
            lambda: r.run_pass(changed).views["default/a"].applied,
            "the scale-down once the fast gateway accepted",
            timeout=10,
        )
        assert [a.kind for a in done] == ["remove"]
        assert gate.pushes_to("10.123.0.2") == 1, "the hung push is not piled on"
    finally:
        gate.released.set()
        r.close()


def test_a_stop_waits_until_the_gateway_accepted_a_state_without_the_replica() -> None:
    swarm = overlay_swarm(nodes=2)
    gate = Gate()
    r, gateways, desired = two_gateways(swarm, gate)
    recorded_writes(swarm, gate.log, gate.lock)
    settled: list[int] = []
    assert gateways.pusher is not None
    gateways.pusher.on_settled = lambda: settled.append(1)
    try:
        r.run_pass(desired)
        assert gateways.pusher.settle(10)
        gate.log.clear()
        changed = a_scaled_down(desired)
        first = r.run_pass(changed)
        assert first.views["default/a"].applied == []
        assert metrics.REGISTRY.get_sample_value("npuswarm_gateway_held_writes") == 1
        wait_for(lambda: settled, "the pusher asks for a pass once the hold ended")
        assert gateways.pusher.settle(10)
        second = r.run_pass(changed)
        assert [a.kind for a in second.views["default/a"].applied] == ["remove"]
        assert metrics.REGISTRY.get_sample_value("npuswarm_gateway_held_writes") == 0
        fast_pushes = [i for i, e in enumerate(gate.log) if e[:2] == ("push", "10.123.0.1")]
        (removal,) = [i for i, e in enumerate(gate.log) if e[0] == "remove"]
        assert fast_pushes and fast_pushes[0] < removal
        assert gate.log[fast_pushes[0]][2] == {"served-a": 1}
    finally:
        r.close()


def test_a_gateway_that_fails_holds_nothing_and_backs_off_alone() -> None:
    swarm = overlay_swarm(nodes=2)
    gate = Gate()
    gate.fail.add("10.123.0.2")
    r, gateways, desired = two_gateways(swarm, gate)
    try:
        r.run_pass(desired)
        assert gateways.pusher is not None and gateways.pusher.settle(10)
        status = r.run_pass(desired).gateways
        assert status["default/slow"].readyReplicas == 0
        assert "connection refused" in {c.type: c.message for c in status["default/slow"].conditions}["Ready"]
        assert status["default/fast"].readyReplicas == 1
        # b's replica is listed by the failing gateway's last known state (none: it never
        # answered), so stopping it waits for nothing.
        changed = Desired(
            deployments=[desired.deployments[0], served_by("slow", model("b", engine={"maxModelLen": 4096}))],
            gateways=desired.gateways,
        )
        assert [a.kind for a in r.run_pass(changed).views["default/b"].applied] == ["update"]
    finally:
        r.close()
    assert [push_backoff(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert push_backoff(30) == MAX_PUSH_BACKOFF_SECONDS


def test_a_new_operator_holds_stops_until_it_has_told_each_gateway() -> None:
    """After a restart or a failover the pusher has not heard from any gateway replica: each
    may still list every replica it serves, so no stop goes out before its first push."""
    swarm = overlay_swarm(nodes=2)
    gate = Gate()
    r, _, desired = two_gateways(swarm, gate)
    r.run_pass(desired)
    r.close()
    gate.hang.add("10.123.0.1")
    successor_gateways = Gateways("default", CREDENTIALS, send=gate.send)
    successor = Reconciler(swarm, Settings(), clock=lambda: NOW, gateways=successor_gateways)
    try:
        changed = a_scaled_down(desired)
        assert successor.run_pass(changed).views["default/a"].applied == []
        assert successor.run_pass(changed).views["default/a"].applied == [], "still not heard"
        gate.released.set()
        wait_for(
            lambda: successor.run_pass(changed).views["default/a"].applied,
            "the stop once the gateway accepted",
            timeout=10,
        )
    finally:
        gate.released.set()
        successor.close()


def test_an_instance_without_the_lease_pushes_nothing() -> None:
    swarm = overlay_swarm(nodes=2)
    gate = Gate()
    r, gateways, desired = two_gateways(swarm, gate)
    assert gateways.pusher is not None
    leading = threading.Event()
    gateways.pusher.fence = leading.is_set
    fenced = metrics.REGISTRY.get_sample_value(
        "npuswarm_gateway_pushes_total", {"outcome": "fenced"}
    ) or 0.0
    try:
        r.run_pass(desired)
        wait_for(
            lambda: (metrics.REGISTRY.get_sample_value(
                "npuswarm_gateway_pushes_total", {"outcome": "fenced"}) or 0.0) > fenced,
            "a fenced push",
        )
        assert not any(entry[0] == "push" for entry in gate.log)
        leading.set()
        wait_for(lambda: gate.pushes_to("10.123.0.1") == 1, "pushed once the lease is held")
    finally:
        r.close()
