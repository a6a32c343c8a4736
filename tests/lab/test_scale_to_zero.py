"""Scale to zero and back on the multi-node lab: a ModelGateway (the gateway image) in front
of a fake vLLM deployment with autoscaling.minReplicas 0. The operator's loops run here as it
runs them (hack/lib/operatorloops.py): the autoscaler's own loop (5 s rounds, the gateways
serving a model at zero long-polled between them, a woken replica's task watched) in its thread, and passes at once when it asks for one,
else every second (the task poll's pace while work is under way). The invariant checker looks
after every pass.

Figures printed (`pytest -s`): the time to zero after the last request, the replica's start
time as Swarm measured it, and the latency the first request after zero paid on top of a warm
one."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

import swarmlab
from npuswarm.api.deployment import ModelDeployment
from npuswarm.api.gateway import ModelGateway
from npuswarm.gateway.credentials import Credentials
from npuswarm.gateway.push import Gateways
from npuswarm.reconcile import PassResult, Reconciler
from npuswarm.swarm import Swarm
from operatorloops import OperatorLoops
from tests import invariants
from tests.helpers import wait_for

from .conftest import lab_settings, tear_down
from .test_gateway import ROOT_KEY, Reply, gateway, network, post  # noqa: F401 (a fixture)
from .test_npuswarm_on_lab import lab_model

pytestmark = pytest.mark.lab

KEY = "lab/sleepy"
MODEL = "sleepy-chat"
IDLE_WINDOW = 10  # scaleDownStabilizationSeconds: no request this long -> zero
LOAD_SECONDS = "4"  # the fake vLLM's model load before /health answers
WAIT = 30  # the gateway's scaleFromZero.maxWaitSeconds
RETRY_AFTER = 11
# What the first request after zero may pay beyond the replica's own start time: the
# autoscaler's long poll answered at once, a pass creating the service, the watch of that
# service's task (every 0.2 s), the pass that sees it running and its push to the gateway.
# The "about 2 s"; measured here 0.1-0.3 s (before the long poll and the watch: 1.1-2.1
# s, up to 1 s each for the wake read and the busy task poll).
MARGIN_SECONDS = 2.0
POOL = {"npuswarm.io/test-pool": "zero"}  # node 2: where sleepy (and the hog) may go


def sleepy(net: str) -> ModelDeployment:
    return lab_model(
        "sleepy", "2026-02-01T00:00:00Z", net,
        servedModelName=MODEL,
        nodeSelector=POOL,
        engine={"port": 8000, "env": {"FAKE_VLLM_LOAD_SECONDS": LOAD_SECONDS}},
        autoscaling={
            "minReplicas": 0,
            "maxReplicas": 1,
            "target": {"metric": "requestsWaitingPerReplica", "value": 1},
            "scaleUpStabilizationSeconds": 0,
            "scaleDownStabilizationSeconds": IDLE_WINDOW,
        },
    )


def hog(net: str) -> ModelDeployment:
    """Every NPU of the pool's one node (8): sleepy has none to wake on."""
    return lab_model("hog", "2026-01-01T00:00:00Z", net, nodeSelector=POOL, npusPerReplica=8,
                     engine={"port": 8000})


def zero_gateway(image: str) -> ModelGateway:
    made = gateway(image, replicas=1)
    body = made.model_dump(mode="json", exclude_none=True)
    body["spec"]["scaleFromZero"] = {"maxWaitSeconds": WAIT, "retryAfterSeconds": RETRY_AFTER}
    return ModelGateway.model_validate(body)


class Operator(OperatorLoops):
    def __init__(self, reconciler: Reconciler, deployments: list[ModelDeployment],
                 gw: ModelGateway, gateways: Gateways, api: Any) -> None:
        super().__init__(reconciler, deployments, gw, gateways, check=self.invariants)
        self.api = api

    def invariants(self) -> list[str]:
        """No NPU held twice, no replica served by two services (after every pass)."""
        found = invariants.npu_conflicts(self.api, "npuswarm.io/managed-by=npuswarm")
        services = self.api.services(filters={"label": "npuswarm.io/managed-by=npuswarm"})
        slots = Counter((s["Spec"]["Labels"].get("npuswarm.io/owner-name"),
                         s["Spec"]["Labels"].get("npuswarm.io/replica")) for s in services
                        if "npuswarm.io/owner-name" in s["Spec"]["Labels"])
        return found + [f"{o} replica {r} has {n} services" for (o, r), n in slots.items() if n > 1]

    def check(self) -> None:
        assert not self.errors, self.errors
        assert not self.violations, self.violations

    def until(self, check: Any, what: str, timeout: float = 120) -> PassResult:
        def probe() -> PassResult | None:
            if self.errors:
                raise AssertionError(self.errors)
            last = self.last
            return last if last is not None and check(last) else None
        try:
            return wait_for(probe, what, timeout=timeout, interval=0.2)
        except pytest.fail.Exception:
            if self.last is not None:
                for key, view in self.last.views.items():
                    print(key, view.status.replicas, view.status.autoscaler,
                          [(c.type, c.reason, c.message) for c in view.status.conditions])
            raise

    def services(self, name: str = KEY.split("/")[1]) -> list[dict[str, Any]]:
        return self.api.services(filters={"label": f"npuswarm.io/owner-name={name}"})


def backends(result: PassResult) -> int:
    status = result.gateways["lab/gw"]
    return next((len(m.backends) for m in status.models if m.model == MODEL), 0)


def replicas(result: PassResult) -> int:
    return result.views[KEY].status.replicas


def ask(url: str) -> Reply:
    return post(f"{url}/v1/chat/completions",
                {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
                timeout=WAIT + 60)


def swarm_time(value: str) -> float:
    """Swarm's RFC 3339 timestamps (nanoseconds) as seconds since the epoch."""
    head, _, rest = value.rstrip("Z").partition(".")
    fraction = float("0." + (rest or "0"))
    return datetime.fromisoformat(head + "+00:00").timestamp() + fraction


def start_times(api: Any, service: dict[str, Any]) -> tuple[float, float]:
    """The service's creation and its task running (seconds since the epoch), as Swarm
    recorded both (a task with a health check is 'starting' until the check passes, then
    'running')."""
    (task,) = [t for t in api.tasks(filters={"service": service["ID"]})
               if t["Status"]["State"] == "running"]
    return swarm_time(service["CreatedAt"]), swarm_time(task["Status"]["Timestamp"])


@pytest.fixture(scope="module")
def operator(swarm_lab: swarmlab.Lab, gateway_image: str, network: str) -> Iterator[Operator]:  # noqa: F811
    api = swarm_lab.client(1).api
    node = swarm_lab.swarm_node(2)
    api.update_node(node["ID"], node["Version"]["Index"],
                    dict(node["Spec"], Labels={**node["Spec"].get("Labels", {}), **POOL}))
    settings = lab_settings(gateway_root_key=ROOT_KEY, lost_node_grace_seconds=3)
    gateways = Gateways(settings.instance, Credentials(ROOT_KEY, settings.instance),
                        policy=settings.tenant_policy())
    reconciler = Reconciler(Swarm(base_url=swarm_lab.endpoint), settings, gateways=gateways)
    made = Operator(reconciler, [sleepy(network)], zero_gateway(gateway_image), gateways, api)
    try:
        with made:
            made.until(lambda r: r.gateways["lab/gw"].readyReplicas == 1 and backends(r) == 1
                       and r.views[KEY].status.phase == "Ready",
                       "the gateway and sleepy's first replica ready", timeout=240)
            yield made
    finally:
        tear_down(reconciler, made.deployments)
        node = swarm_lab.swarm_node(2)
        labels = {k: v for k, v in node["Spec"].get("Labels", {}).items() if k not in POOL}
        api.update_node(node["ID"], node["Version"]["Index"], dict(node["Spec"], Labels=labels))


def test_an_idle_model_goes_to_zero_and_its_first_request_is_answered(operator: Operator) -> None:
    warm = [ask(operator.url) for _ in range(3)]
    assert [r.status for r in warm] == [200, 200, 200], [r.body[:200] for r in warm]
    latencies = []
    for _ in range(3):
        reply = ask(operator.url)
        latencies.append(time.monotonic() - reply.started)
        assert reply.status == 200
    warm_latency = min(latencies)
    last_request = time.monotonic()

    zero = operator.until(lambda r: replicas(r) == 0 and not operator.services(),
                          "sleepy scaled to zero after its idle window", timeout=IDLE_WINDOW + 60)
    to_zero = time.monotonic() - last_request
    assert zero.views[KEY].status.npus == 0
    assert [e for _, e in operator.events if e.reason == "ScaledToZero"]
    # Out of the gateway, which is not degraded by a model at zero (no alert either).
    operator.until(lambda r: backends(r) == 0 and r.gateways["lab/gw"].phase == "Ready",
                   "sleepy out of the gateway, the gateway Ready")

    asked, asked_wall = time.monotonic(), time.time()
    first = ask(operator.url)
    latency = time.monotonic() - asked
    assert first.status == 200, first.body[:300]
    assert first.json()["choices"][0]["message"]["content"]
    (service,) = operator.services()
    created, running = start_times(operator.api, service)
    start = running - created
    added = latency - warm_latency
    woke = [(when, e) for when, e in operator.events if e.reason == "ScaledFromZero"]
    # Where the rest went: held -> the service created (the wake read and a pass), and the
    # replica running -> the answer (the pass that saw it ready, its push, the request).
    print(f"\nscale to zero {to_zero:.1f} s after the last request (window {IDLE_WINDOW} s); "
          f"first request after zero: {latency:.2f} s (warm {warm_latency:.3f} s), added "
          f"{added:.2f} s; the replica's start time (Swarm: created -> running) {start:.2f} s "
          f"(model load {LOAD_SECONDS} s); added - start = {added - start:.2f} s "
          f"(margin {MARGIN_SECONDS} s): held -> service created {created - asked_wall:.2f} s, "
          f"running -> answered {asked_wall + latency - running:.2f} s; "
          f"{woke[0][1].message if woke else 'no event'}")
    assert woke and "held at the gateway: 0 -> 1" in woke[0][1].message
    assert added <= start + MARGIN_SECONDS
    operator.check()


def test_with_no_npus_free_a_request_gets_503_with_retry_after_within_the_wait(
    operator: Operator, network: str,  # noqa: F811
) -> None:
    operator.until(lambda r: replicas(r) == 0 and not operator.services(),
                   "sleepy back at zero", timeout=IDLE_WINDOW + 60)
    operator.deployments.append(hog(network))
    operator.wanted.set()
    operator.until(lambda r: "lab/hog" in r.views and r.views["lab/hog"].status.readyReplicas == 1,
                   "the hog holding all 8 NPUs of the pool's node", timeout=120)
    asked = time.monotonic()
    refused = ask(operator.url)
    waited = time.monotonic() - asked
    print(f"\nno NPUs: {refused.status} after {waited:.1f} s (wait {WAIT} s), Retry-After "
          f"{refused.headers.get('retry-after')}")
    assert refused.status == 503, refused.body[:300]
    assert refused.json()["error"]["code"] == "model_not_ready"
    assert refused.headers["retry-after"] == str(RETRY_AFTER)
    # Held for the configured wait, then answered (the client's own timeout is WAIT + 60).
    assert WAIT <= waited < WAIT + 10
    assert not operator.services()
    # While the request was held, the autoscaler said why it asked for nothing.
    assert "WaitingForNPUs" in operator.reasons[KEY], sorted(set(operator.reasons[KEY]))
    operator.check()
