"""The pass's side of ModelGateways: compute (gateway.py), push each replica's backends over
HTTP before the pass's Swarm writes, and report their status and metrics.

The push goes to every running gateway replica's admin port, at its node's address (host
mode), with the bearer token from NPUSWARM_GATEWAY_TOKEN. It is the full state, so pushing
twice is harmless and a restarted gateway is refilled by the next pass.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog

from npuswarm import metrics
from npuswarm.api import ModelDeployment
from npuswarm.gateway import (
    Backends,
    GatewayWork,
    desired_backends,
    gateway_actions,
    gateway_status,
    running_replicas,
    selected,
    stopped_by,
)
from npuswarm.gateway_api import ModelGateway, ModelGatewayStatus
from npuswarm.plan import Action, PassPlan

log = structlog.get_logger("npuswarm.gateway")
PUSH_TIMEOUT_SECONDS = 5.0
PUSH_CONCURRENCY = 8
# The same state is not pushed again to the same gateway task for this long: a pass where
# nothing changed makes no call. The gateway keeps what it got; the refresh only bounds how
# long a gateway that lost it somehow (it cannot without a new task) would go without.
REFRESH_SECONDS = 60.0
NO_TOKEN = "NPUSWARM_GATEWAY_TOKEN is not set in the operator: gateways cannot be configured"
# (admin URL, token, {"models": ...}) -> None, or raises with the reason.
Sender = Callable[[str, str, Backends], None]


def put_backends(admin_url: str, token: str, backends: Backends) -> None:
    body = json.dumps({"models": backends}).encode()
    request = urllib.request.Request(
        f"{admin_url}/backends",
        data=body,
        method="PUT",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=PUSH_TIMEOUT_SECONDS) as answer:
            answer.read()
    except urllib.error.HTTPError as error:
        raise RuntimeError(f"{error.code}: {error.read()[:200].decode(errors='replace')}") from None


@dataclass
class GatewayPass:
    works: list[GatewayWork] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)  # the gateways' own services


class Gateways:
    """What reconcile.Reconciler calls around a pass's writes (see run_pass)."""

    def __init__(
        self,
        instance: str,
        token: str,
        send: Sender = put_backends,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.instance = instance
        self.token = token
        self.send = send
        self.clock = clock
        # (admin URL, task id) -> (backends, when) of the last push it accepted.
        self._pushed: dict[tuple[str, str], tuple[Backends, float]] = {}
        self._pushers = ThreadPoolExecutor(PUSH_CONCURRENCY, thread_name_prefix="gateway-push")

    def close(self) -> None:
        self._pushers.shutdown(wait=True)

    def prepare(
        self,
        gateways: Sequence[ModelGateway],
        deployments: Sequence[ModelDeployment],
        whole: PassPlan,
    ) -> GatewayPass:
        """Pure: each gateway's backends once this pass's writes are made, minus every
        replica those writes stop, and the writes of the gateways' own services."""
        stopping = stopped_by(whole.actions)
        works = [
            GatewayWork(
                gateway=gw,
                backends=desired_backends(gw, deployments, whole.snapshot, stopping),
                replicas=running_replicas(gw, whole.snapshot),
            )
            for gw in gateways
        ]
        actions = (
            gateway_actions(gateways, whole.snapshot, self.instance, self.token)
            if self.token
            else []
        )
        return GatewayPass(works=works, actions=actions)

    def push(self, work: GatewayPass) -> None:
        """Every replica of every gateway, at once; waits for all. A replica that cannot be
        reached is reported in its gateway's status; the pass goes on (that replica, being
        unreachable, is not serving clients either; its vllm-router's own health checks
        drop a stopped backend within interval x threshold)."""
        if not self.token:
            return
        now = self.clock()
        live = {(r.admin_url, r.task) for item in work.works for r in item.replicas}
        self._pushed = {key: value for key, value in self._pushed.items() if key in live}
        jobs = []
        for item in work.works:
            for replica in item.replicas:
                key = (replica.admin_url, replica.task)
                last = self._pushed.get(key)
                if (
                    last is not None
                    and last[0] == item.backends
                    and now - last[1] < REFRESH_SECONDS
                ):
                    continue
                send = self._pushers.submit(self.send, replica.admin_url, self.token, item.backends)
                jobs.append((item, key, send))
        for item, key, future in jobs:
            try:
                future.result()
            except Exception as error:
                self._pushed.pop(key, None)
                item.push_errors[key[0]] = str(error)[:300]
                metrics.gateway_pushes_total.labels("error").inc()
                log.warning(
                    "gateway push failed",
                    gateway=item.gateway.key,
                    replica=key[0],
                    error=str(error),
                )
            else:
                self._pushed[key] = (item.backends, now)
                metrics.gateway_pushes_total.labels("success").inc()

    def statuses(
        self,
        work: GatewayPass,
        deployments: Sequence[ModelDeployment],
        previous: Mapping[str, Mapping[str, Any]],
        now: datetime,
    ) -> dict[str, ModelGatewayStatus]:
        found: dict[str, ModelGatewayStatus] = {}
        metrics.gateway_backends.clear()
        metrics.gateway_replicas_ready.clear()
        for item in work.works:
            gw = item.gateway
            served = {md.spec.served_model_name: md.key for md in selected(gw, deployments)}
            status = gateway_status(
                item,
                served,
                (previous.get(gw.key) or {}).get("conditions", []),
                now,
                problem=None if self.token else NO_TOKEN,
            )
            found[gw.key] = status
            namespace, name = gw.metadata.namespace, gw.metadata.name
            for model, urls in item.backends.items():
                metrics.gateway_backends.labels(namespace, name, model).set(len(urls))
            metrics.gateway_replicas_ready.labels(namespace, name).set(status.readyReplicas)
        return found
