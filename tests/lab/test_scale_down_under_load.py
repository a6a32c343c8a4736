"""Scale-down under steady light load on the multi-node lab (issue 21, item 7): three replicas
of a fake vLLM behind a ModelGateway (the gateway image), four clients sending one request
after another, the autoscaler bringing the count to 1 once its scale-down window has passed.
At least 2,000 requests, none may fail: each removed replica leaves the gateway before its
service is removed, and finishes what it runs within the stop grace period. The operator's
loops run as in test_scale_to_zero.py, with the invariant checker after every pass."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

import swarmlab
from npuswarm.api.deployment import ModelDeployment
from npuswarm.gateway.credentials import Credentials
from npuswarm.gateway.push import Gateways
from npuswarm.reconcile import PassResult, Reconciler
from npuswarm.swarm import Swarm
from tests.helpers import wait_for

from .conftest import lab_settings, tear_down
from .test_gateway import ROOT_KEY, Load, gateway, network  # noqa: F401 (a fixture)
from .test_npuswarm_on_lab import lab_model
from .test_scale_to_zero import Operator

pytestmark = pytest.mark.lab

KEY = "lab/steady"
MODEL = "steady-chat"
DOWN_WINDOW = 15
REQUESTS = 2000
CLIENTS = 4


def steady(net: str) -> ModelDeployment:
    return lab_model(
        "steady", "2026-03-01T00:00:00Z", net,
        servedModelName=MODEL,
        # 0.1 s a request: the removed replicas have requests in flight when they are told to go.
        engine={"port": 8000, "env": {"FAKE_VLLM_LATENCY_SECONDS": "0.1"}},
        autoscaling={
            "minReplicas": 1,
            "maxReplicas": 3,
            # Four clients keep nothing waiting: the load asks for one replica.
            "target": {"metric": "requestsWaitingPerReplica", "value": 2},
            "scaleUpStabilizationSeconds": 0,
            "scaleDownStabilizationSeconds": DOWN_WINDOW,
        },
    )


def backends(result: PassResult) -> int:
    status = result.gateways["lab/gw"]
    return next((len(m.backends) for m in status.models if m.model == MODEL), 0)


@pytest.fixture(scope="module")
def operator(swarm_lab: swarmlab.Lab, gateway_image: str, network: str) -> Iterator[Operator]:  # noqa: F811
    api = swarm_lab.client(1).api
    settings = lab_settings(gateway_root_key=ROOT_KEY, lost_node_grace_seconds=3)
    gateways = Gateways(settings.instance, Credentials(ROOT_KEY, settings.instance),
                        policy=settings.tenant_policy())
    reconciler = Reconciler(Swarm(base_url=swarm_lab.endpoint), settings, gateways=gateways)
    made = Operator(reconciler, [steady(network)], gateway(gateway_image, replicas=1), gateways, api)
    # As after an earlier scale-up (or an operator restart): the status says 3.
    made.previous = {KEY: {"replicas": 3}}
    try:
        with made:
            made.until(lambda r: backends(r) == 3 and r.views[KEY].status.readyReplicas == 3
                       and r.gateways["lab/gw"].readyReplicas == 1,
                       "three replicas ready behind the gateway", timeout=240)
            yield made
    finally:
        tear_down(reconciler, made.deployments)


def test_a_scale_down_under_steady_light_load_fails_no_request(operator: Operator) -> None:
    with Load(operator.url, MODEL, workers=CLIENTS) as light:
        started = time.monotonic()
        wait_for(lambda: len({r.replica["hostname"] for r in light.replies if r.status == 200}) == 3,
                 "all three replicas answering", timeout=60, interval=0.5)
        operator.until(lambda r: r.views[KEY].status.replicas == 1 and backends(r) == 1
                              and not [s for s in operator.services("steady")
                                       if s["Spec"]["Labels"].get("npuswarm.io/replica") != kept(r)],
                              "the scale-down to 1, two services removed", timeout=DOWN_WINDOW + 90)
        removed_at = time.monotonic()
        wait_for(lambda: len(light.replies) >= REQUESTS and time.monotonic() - removed_at >= 5,
                 f"{REQUESTS} requests, 5 s of them after the scale-down", timeout=600, interval=0.5)
    elapsed = time.monotonic() - started
    replies = list(light.replies)
    failed = [r for r in replies if r.status != 200]
    after = [r for r in replies if r.started >= removed_at]
    scaled = [(when, e.message) for when, e in operator.events if e.reason == "Autoscaled"]
    events = [message for _, message in scaled]
    decided = scaled[0][0] if scaled else removed_at
    before = [r for r in replies if r.started < decided]
    print(f"\nscale-down 3 -> 1 under {CLIENTS} clients: {len(replies)} requests in {elapsed:.0f} s "
          f"({len(replies) / elapsed:.0f}/s), {len(failed)} failed; {len(before)} before the "
          f"decision ({decided - started:.1f} s into the load, window {DOWN_WINDOW} s), "
          f"{len(replies) - len(before) - len(after)} while the two replicas left, {len(after)} "
          f"after; {events}")
    assert len(replies) >= REQUESTS
    assert not failed, [(r.status, r.body[:200]) for r in failed[:5]]
    # Only the replica kept answered after the removals (container hostnames).
    assert len({r.replica["hostname"] for r in after}) == 1
    assert any("-> 1" in message for message in events), events
    operator.check()


def kept(result: PassResult) -> str:
    (replica,) = result.views[KEY].status.replicaStatuses
    return replica.replica
