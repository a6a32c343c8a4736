"""Preemption on a full lab (issue 21 item 4): 24 NPUs on 3 nodes all held by priority-0
replicas of two models behind a ModelGateway (the gateway image, the fake vLLM), under load;
a priority-100 deployment arrives. The Reconciler runs passes as the operator runs them.

Shown: the fewest replicas are stopped (one 4-NPU replica, not two 2-NPU ones); the victim
left every gateway replica (the pushed backends) before its service was removed; the new
replica was created only once no live task held the victim's NPUs any more (the victim drains
its requests under way first, within its stop grace); no request to the victim's model
failed; no NPU was held by two tasks at any pass; events and status name both sides."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

import swarmlab
from npuswarm import metrics
from npuswarm.api import labels
from npuswarm.api.deployment import ModelDeployment
from npuswarm.core.pipeline import Desired
from npuswarm.gateway.credentials import Credentials
from npuswarm.gateway.push import Gateways, PushTarget
from npuswarm.reconcile import PassResult, Reconciler
from npuswarm.runtime.autoscaler import Autoscaler
from npuswarm.swarm import Swarm
from tests.helpers import wait_for
from tests.invariants import LIVE_STATES, npu_conflicts

from .conftest import lab_settings, tear_down
from .test_gateway import ROOT_KEY, Load, gateway, network  # noqa: F401 (a fixture)
from .test_gateway import model as gateway_model

pytestmark = pytest.mark.lab

# Each completion takes this long, so the victim has requests under way when it is told to
# stop and drains them (FAKE_VLLM_DRAIN_SECONDS) while Swarm lists its task as stopping.
LATENCY = "2"


def low_model(name: str, created: str, npus: int, replicas: int) -> ModelDeployment:
    md = gateway_model(name, created, replicas=replicas, npusPerReplica=npus, priority=0)
    env = {**md.spec.engine.env, "FAKE_VLLM_LATENCY_SECONDS": LATENCY, "FAKE_VLLM_DRAIN_SECONDS": "20"}
    return md.model_copy(update={"spec": md.spec.model_copy(
        update={"engine": md.spec.engine.model_copy(update={"env": env})})})


@dataclass
class Recorded:
    """The order of what the operator did: gateway pushes (what each held) and Swarm writes."""

    log: list[tuple[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, what: Any) -> None:
        with self.lock:
            self.log.append((kind, what))


@dataclass
class Lab:
    reconciler: Reconciler
    swarm: Swarm
    deployments: list[ModelDeployment]
    gateway: Any
    recorded: Recorded
    last: PassResult | None = None
    passes: list[PassResult] = field(default_factory=list)
    scaler: Autoscaler | None = None  # the autoscaler's loop body, after every pass

    def converge(self, check: Any, what: str, timeout: float = 180) -> PassResult:
        def done() -> PassResult | None:
            desired = Desired(deployments=self.deployments, gateways=[self.gateway])
            if self.scaler is not None:
                desired = self.scaler.serve(desired)
            self.last = self.reconciler.run_pass(desired)
            if self.scaler is not None:
                self.scaler.saw_pass(self.last.plan)
                self.scaler.tick()
            self.passes.append(self.last)
            conflicts = npu_conflicts(self.swarm.api)
            assert not conflicts, conflicts
            return self.last if check(self.last) else None

        return wait_for(done, what, timeout=timeout, interval=0.5)

    @property
    def url(self) -> str:
        assert self.last is not None
        endpoint = self.last.gateways["lab/gw"].endpoint
        assert endpoint
        return "http://" + endpoint.split(", ")[0]


def backends(result: PassResult, model_name: str) -> list[str]:
    status = result.gateways["lab/gw"]
    return next((m.backends for m in status.models if m.model == model_name), [])


def live_holders(swarm: Swarm, node_id: str, npus: set[str]) -> list[str]:
    """Live tasks (of any service, removed ones included) holding one of ``npus`` on a node."""
    found = []
    for task in swarm.api.tasks():
        if task.get("NodeID") != node_id or (task.get("Status") or {}).get("State") not in LIVE_STATES:
            continue
        env = dict(e.split("=", 1) for e in (task.get("Spec") or {}).get("ContainerSpec", {}).get("Env") or []
                   if "=" in e)
        if set(env.get("ASCEND_VISIBLE_DEVICES", "").split(",")) & npus:
            found.append(f"{task['ServiceID'][:10]} desired={task.get('DesiredState')}")
    return found


@pytest.fixture(scope="module")
def full_lab(swarm_lab: swarmlab.Lab, gateway_image: str, network: str) -> Iterator[Lab]:  # noqa: F811
    settings = lab_settings(gateway_root_key=ROOT_KEY, lost_node_grace_seconds=3, stop_grace_seconds=30)
    recorded = Recorded()
    gateways = Gateways(settings.instance, Credentials(ROOT_KEY, settings.instance), policy=settings.tenant_policy())
    assert gateways.pusher is not None
    real_send = gateways.pusher.send

    def send(target: PushTarget, state: dict[str, Any]) -> None:
        real_send(target, state)
        recorded.add("push", {m: sorted(urls) for m, urls in state["models"].items()})

    gateways.pusher.send = send
    swarm = Swarm(base_url=swarm_lab.endpoint)
    real_remove, real_create = swarm.remove_service, swarm.create_service

    def remove_service(service_id: str) -> None:
        recorded.add("remove", service_id)
        real_remove(service_id)

    def create_service(spec: dict[str, Any]) -> str:
        service_labels = spec["Labels"]
        if labels.NODE in service_labels:  # a replica (not the gateway)
            npus = set(service_labels[labels.NPUS].split(","))
            recorded.add("create", (spec["Name"], live_holders(swarm, service_labels[labels.NODE], npus)))
        return real_create(spec)

    swarm.remove_service = remove_service  # type: ignore[method-assign]
    swarm.create_service = create_service  # type: ignore[method-assign]
    reconciler = Reconciler(swarm, settings, gateways=gateways)
    # 16 + 8 NPUs: the three nodes full.
    big = low_model("big", "2026-02-01T00:00:00Z", npus=4, replicas=4)
    small = low_model("small", "2026-02-02T00:00:00Z", npus=2, replicas=4)
    made = Lab(reconciler, swarm, [big, small], gateway(gateway_image), recorded,
               scaler=Autoscaler(gateways.read_load, lambda key: None))
    try:
        made.converge(
            lambda r: r.gateways["lab/gw"].readyReplicas == 2
            and len(backends(r, "big-chat")) == 4 and len(backends(r, "small-chat")) == 4
            and all(v.status.phase == "Ready" for v in r.views.values()),
            "the gateway and 8 low-priority replicas on all 24 NPUs", timeout=240,
        )
        yield made
    finally:
        tear_down(reconciler, made.deployments)


def test_a_higher_priority_replica_stops_the_fewest_lower_ones_which_left_the_gateway_first(
    full_lab: Lab,
) -> None:
    lab = full_lab
    before = lab.last
    assert before is not None
    small_services = {s.name for s in before.plan.snapshot.services_of("lab/small")}
    network_name = lab.gateway.spec.network.name
    big_ips = {s.name: {t.address_on(network_name) for t in s.tasks} - {None}
               for s in before.plan.snapshot.services_of("lab/big")}
    counted = metrics.REGISTRY.get_sample_value("npuswarm_preemptions_total", {"namespace": "lab"}) or 0
    urgent = gateway_model("urgent", "2026-02-03T00:00:00Z", npusPerReplica=4, priority=100)
    with Load(lab.url, "big-chat", workers=6) as load:
        wait_for(lambda: len(load.replies) >= 6, "the load under way", timeout=60, interval=0.2)
        lab.recorded.log.clear()
        started = time.monotonic()
        lab.deployments = [*lab.deployments, urgent]
        done = lab.converge(
            lambda r: r.views["lab/urgent"].status.phase == "Ready" and len(backends(r, "urgent-chat")) == 1,
            "the priority-100 replica ready", timeout=180,
        )
        took = time.monotonic() - started
    # A pass whose victim removal waits for the gateways' acknowledgement decides the same
    # preemption again in the next pass, which removes it: one decision, however many passes.
    preemptions = list({p: None for r in lab.passes for p in r.plan.preemptions})
    assert len(preemptions) == 1, preemptions
    (victim,) = preemptions[0].victims
    print(f"urgent Ready {took:.1f}s after it was applied; victim {victim.name} on {preemptions[0].nodes}; "
          f"{len(load.replies)} requests to big-chat, {len(load.failed())} failed")
    assert victim.deployment == "lab/big" and victim.npus == 4, "one 4-NPU replica, not two 2-NPU ones"
    assert {s.name for s in done.plan.snapshot.services_of("lab/small")} == small_services

    # The victim left every gateway replica before its service was removed.
    log = lab.recorded.log
    victim_service = f"lab-big-{victim.replica}"
    (removed_at,) = [i for i, (kind, what) in enumerate(log) if kind == "remove" and what in {
        s.id for s in before.plan.snapshot.services_of("lab/big") if s.name == victim_service}]
    victim_ips = big_ips[victim_service]
    assert victim_ips
    pushes_before = [what for kind, what in log[:removed_at] if kind == "push"]
    assert len(pushes_before) >= 2, "both gateway replicas were told first"
    for what in pushes_before[-2:]:
        assert len(what["big-chat"]) == 3
        assert not any(ip in url for ip in victim_ips for url in what["big-chat"])

    # The new replica was created only when no live task held those NPUs any more.
    (created,) = [what for kind, what in log if kind == "create" and what[0] == "lab-urgent-0"]
    assert created[1] == [], f"NPUs still held at the create: {created[1]}"
    assert [i for i, (kind, what) in enumerate(log) if kind == "create"][0] > removed_at

    assert not load.failed(), [r.body[:200] for r in load.failed()][:3]
    assert metrics.REGISTRY.get_sample_value("npuswarm_preemptions_total", {"namespace": "lab"}) == counted + 1
    big = done.views["lab/big"].status
    assert big.placedReplicas == 3 and big.phase == "Progressing"
    events = [e for r in lab.passes for e in r.views["lab/big"].events if e.reason == "Preempted"]
    assert events and "lab/urgent[0] (priority 100 > 0)" in events[0].message
    preempting = [e for r in lab.passes if "lab/urgent" in r.views
                  for e in r.views["lab/urgent"].events if e.reason == "Preempting"]
    assert preempting and victim.name in preempting[0].message


def elastic_model() -> ModelDeployment:
    """Priority 100, autoscaled 1 -> 2 on waiting requests; its engine runs one request at a
    time, so a few clients keep requests waiting."""
    md = gateway_model(
        "elastic", "2026-02-04T00:00:00Z", npusPerReplica=2, priority=100,
        autoscaling={
            "minReplicas": 1,
            "maxReplicas": 2,
            "target": {"metric": "requestsWaitingPerReplica", "value": 1},
            "scaleUpStabilizationSeconds": 3,
            "scaleDownStabilizationSeconds": 600,
        },
    )
    env = {**md.spec.engine.env, "FAKE_VLLM_MAX_RUNNING": "1", "FAKE_VLLM_LATENCY_SECONDS": "1"}
    return md.model_copy(update={"spec": md.spec.model_copy(
        update={"engine": md.spec.engine.model_copy(update={"env": env})})})


def test_an_autoscaled_higher_priority_deployment_scales_up_by_preempting(full_lab: Lab) -> None:
    """The lab full of priority-0 replicas (after the test above, or fresh); a priority-100
    autoscaled deployment arrives (its first replica preempts like any replica) and, under
    load, scales up to 2: the scale-up is decided although no NPU is free, and its replica
    placed by stopping one more low-priority replica, which left the gateway first."""
    lab = full_lab
    before = lab.converge(lambda r: True, "a pass")
    assert not any(before.plan.placement.free.values()), "the lab is full"
    network_name = lab.gateway.spec.network.name
    elastic = elastic_model()
    with Load(lab.url, "small-chat", workers=4) as low_load:
        wait_for(lambda: len(low_load.replies) >= 4, "the load under way", timeout=60, interval=0.2)
        lab.deployments = [*lab.deployments, elastic]
        lab.converge(
            lambda r: r.views["lab/elastic"].status.phase == "Ready" and len(backends(r, "elastic-chat")) == 1,
            "the first replica of elastic ready (by preemption)", timeout=180,
        )
        ready = lab.last
        assert ready is not None
        low = [s for key in ("lab/small", "lab/big") for s in ready.plan.snapshot.services_of(key)]
        low_ips = {s.name: {t.address_on(network_name) for t in s.tasks} - {None} for s in low}
        low_names = {s.id: s.name for s in low}
        lab.recorded.log.clear()
        with Load(lab.url, "elastic-chat", workers=4) as load:
            started = time.monotonic()
            decided = lab.converge(
                lambda r: r.views["lab/elastic"].status.replicas == 2,
                "the autoscaler to scale elastic up under load", timeout=90,
            )
            reaction = time.monotonic() - started
            scaler = decided.views["lab/elastic"].status.autoscaler
            assert scaler is not None
            done = lab.converge(
                lambda r: r.views["lab/elastic"].status.readyReplicas == 2 and len(backends(r, "elastic-chat")) == 2,
                "the second replica of elastic ready behind the gateway", timeout=180,
            )
            served = time.monotonic() - started
    scaled_up = [p for r in lab.passes for p in r.plan.preemptions if p.deployment == "lab/elastic" and p.replica == "1"]
    assert scaled_up, "the scale-up's replica was placed by preemption"
    (victim,) = list({v: None for p in scaled_up for v in p.victims})
    print(f"elastic scaled up {reaction:.1f}s into its load ({scaler.lastScaleMessage}); second replica "
          f"serving {served:.1f}s in, victim {victim.name}; {len(load.replies)} requests to elastic-chat, "
          f"{len(load.failed())} failed; {len(low_load.replies)} to small-chat, {len(low_load.failed())} failed")
    assert scaler.lastScaleReason == "ScaledUp" and "1 -> 2" in (scaler.lastScaleMessage or "")
    assert victim.priority == 0 and victim.deployment in ("lab/small", "lab/big")

    # The victim left every gateway replica before its service was removed.
    log = lab.recorded.log
    victim_service = f"lab-{victim.deployment.split('/')[1]}-{victim.replica}"
    (removed_at,) = [i for i, (kind, what) in enumerate(log)
                     if kind == "remove" and low_names.get(what) == victim_service]
    model_name = f"{victim.deployment.split('/')[1]}-chat"
    pushes_before = [what for kind, what in log[:removed_at] if kind == "push"]
    assert len(pushes_before) >= 2, "both gateway replicas were told first"
    victim_ips = low_ips[victim_service]
    assert victim_ips
    for what in pushes_before[-2:]:
        assert not any(ip in url for ip in victim_ips for url in what.get(model_name, []))
    (created,) = [what for kind, what in log if kind == "create" and what[0] == "lab-elastic-1"]
    assert created[1] == [], f"NPUs still held at the create: {created[1]}"

    assert not load.failed(), [r.body[:200] for r in load.failed()][:3]
    assert not low_load.failed(), [r.body[:200] for r in low_load.failed()][:3]
    assert done.views["lab/elastic"].status.replicas == 2
    preempted = [e for r in lab.passes for key in ("lab/small", "lab/big") if key in r.views
                 for e in r.views[key].events if e.reason == "Preempted" and "lab/elastic[1]" in e.message]
    assert preempted, "the victim's Event names the autoscaled replica"
