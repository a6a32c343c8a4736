"""The pass's side of ModelGateways: compute (gateway/backends.py), push each replica's
backends over TLS before the pass's Swarm writes, and report their status and metrics.

The push goes to every running gateway replica's admin port, at its node's address (host
mode), over TLS checked against npuswarm's gateway CA and that gateway's own name, signed with
that gateway's own credential (gateway/protocol.py, docs/security.md). It is the full state,
so pushing twice is harmless and a restarted gateway is refilled by the next pass.
"""

from __future__ import annotations

import dataclasses
import json
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import structlog

from npuswarm import metrics
from npuswarm.api.deployment import ModelDeployment
from npuswarm.api.gateway import ModelGateway, ModelGatewayStatus
from npuswarm.core.diff import Action, PassPlan
from npuswarm.core.hostpolicy import REASON, TenantPolicy, network_violation
from npuswarm.core.snapshot import SwarmSnapshot
from npuswarm.gateway import load, protocol
from npuswarm.gateway.access import KeySet, access_state
from npuswarm.gateway.backends import (
    GatewayReplica,
    GatewayWork,
    desired_backends,
    gateway_status,
    running_replicas,
    selected,
    stopped_by,
    waking_models,
)
from npuswarm.gateway.credentials import Credentials
from npuswarm.gateway.protocol import Signer
from npuswarm.gateway.service import SecretMount, gateway_actions, identity

log = structlog.get_logger("npuswarm.gateway")
PUSH_TIMEOUT_SECONDS = 5.0
PUSH_CONCURRENCY = 8
# Reads of GET /load (the autoscaler): at once, and each bounded like a push.
LOAD_CONCURRENCY = 8
# The same state is not pushed again to the same gateway task for this long: a pass where
# nothing changed makes no call. The gateway keeps what it got; the refresh only bounds how
# long a gateway that lost it somehow (it cannot without a new task) would go without.
REFRESH_SECONDS = 60.0
NO_KEY = "NPUSWARM_ROOT_KEY is not set in the operator: gateways cannot be configured"


@dataclass(frozen=True)
class PushTarget:
    """One gateway replica's admin endpoint and what proves each side to the other."""

    replica: GatewayReplica
    hostname: str  # the name its certificate must carry
    credential: bytes = field(repr=False)


# (target, the gateway's full state) -> None, or raises with the reason.
Sender = Callable[[PushTarget, dict[str, Any]], None]


class KeySource(Protocol):
    """Where ModelGateways' API keys come from (kube.SecretKeys): None when unreadable."""

    def keys(self, namespace: str, name: str) -> KeySet | None: ...


def admin_request(
    target: PushTarget,
    context: ssl.SSLContext,
    signer: Signer,
    method: str,
    path: str,
    body: bytes = b"",
) -> tuple[int, bytes]:
    """One signed request to a gateway replica's admin port over TLS: (status, body)."""
    connection = protocol.PinnedHTTPS(
        target.replica.address,
        target.replica.admin_port,
        target.hostname,
        context,
        PUSH_TIMEOUT_SECONDS,
    )
    try:
        connection.request(
            method, path, body=body, headers=signer.headers(target.credential, method, path, body)
        )
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def https_sender(credentials: Credentials, signer: Signer) -> Sender:
    def send(target: PushTarget, state: dict[str, Any]) -> None:
        body = json.dumps(state).encode()
        status, text = admin_request(
            target, credentials.client_context(), signer, "PUT", "/backends", body
        )
        if status != 200:
            raise RuntimeError(f"{status}: {text[:200].decode(errors='replace')}")

    return send


@dataclass
class GatewayPass:
    works: list[GatewayWork] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)  # the gateways' own services


class Gateways:
    """What reconcile.Reconciler calls around a pass's writes (see run_pass).
    ``credentials``: None when the operator has no root key (gateways are not run)."""

    def __init__(
        self,
        instance: str,
        credentials: Credentials | None,
        send: Sender | None = None,
        clock: Callable[[], float] = time.monotonic,
        policy: TenantPolicy | None = None,
        keys: KeySource | None = None,
    ) -> None:
        self.instance = instance
        self.credentials = credentials
        self.policy = policy or TenantPolicy()
        self.keys = keys
        self.signer = Signer()
        if send is None and credentials is not None:
            send = https_sender(credentials, self.signer)
        self.send = send
        self.clock = clock
        # (admin URL, task id) -> (state, when) of the last push it accepted.
        self._pushed: dict[tuple[str, str], tuple[dict[str, Any], float]] = {}
        self._pushers = ThreadPoolExecutor(PUSH_CONCURRENCY, thread_name_prefix="gateway-push")
        self._readers = ThreadPoolExecutor(LOAD_CONCURRENCY, thread_name_prefix="gateway-load")

    def close(self) -> None:
        self._pushers.shutdown(wait=True)
        self._readers.shutdown(wait=True)

    def read_load(
        self,
        gateways: Sequence[ModelGateway],
        deployments: Sequence[ModelDeployment],
        snapshot: SwarmSnapshot,
    ) -> dict[str, load.ModelLoad]:
        """Each deployment's engine load, from every running replica of every gateway serving
        it (GET /load, signed, LOAD_CONCURRENCY at a time, each within PUSH_TIMEOUT_SECONDS).
        A deployment no gateway serves, or whose gateways all failed to answer, is absent."""
        if self.credentials is None:
            return {}
        credentials = self.credentials
        serving: dict[str, list[str]] = {}
        jobs = []
        for gateway in gateways:
            chosen = [md for md in selected(gateway, deployments) if md.spec.autoscaling]
            if not chosen:
                continue
            for md in chosen:
                serving.setdefault(md.key, []).append(gateway.key)
            who = identity(gateway)
            credential = credentials.credential(who)
            for replica in running_replicas(gateway, snapshot):
                target = PushTarget(replica, who.hostname, credential)
                jobs.append((gateway.key, self._readers.submit(self._get_load, target)))
        answers: dict[str, list[dict[str, Any]]] = {}
        failed: set[str] = set()
        for gateway_key, future in jobs:
            try:
                answers.setdefault(gateway_key, []).append(future.result())
            except Exception as error:
                failed.add(gateway_key)
                metrics.gateway_load_reads_total.labels("error").inc()
                log.warning("gateway load read failed", gateway=gateway_key, error=str(error))
            else:
                metrics.gateway_load_reads_total.labels("success").inc()
        found: dict[str, load.ModelLoad] = {}
        by_key = {md.key: md for md in deployments}
        # Deployments served by the same gateways share one merge: merging once per
        # deployment would read every answer (all its models) once per deployment.
        merged_by: dict[tuple[str, ...], dict[str, load.ModelLoad]] = {}
        for key, gateway_keys in serving.items():
            group = tuple(gateway_keys)
            if group not in merged_by:
                merged_by[group] = load.merge(a for g in group for a in answers.get(g, []))
            model = merged_by[group].get(by_key[key].spec.served_model_name)
            if model is None:
                continue
            if failed.intersection(group):
                # A replica that did not answer may have had requests: not idle.
                model = dataclasses.replace(model, idle_seconds=None)
            found[key] = model
        return found

    def _get_load(self, target: PushTarget) -> dict[str, Any]:
        assert self.credentials is not None
        status, body = admin_request(
            target, self.credentials.client_context(), self.signer, "GET", "/load"
        )
        if status != 200:
            raise RuntimeError(
                f"GET /load answered {status}: {body[:200].decode(errors='replace')}"
            )
        answer: dict[str, Any] = json.loads(body)
        return answer

    def prepare(
        self,
        gateways: Sequence[ModelGateway],
        deployments: Sequence[ModelDeployment],
        whole: PassPlan,
        mounts: Mapping[str, Sequence[SecretMount]],
    ) -> GatewayPass:
        """Pure: each gateway's backends once this pass's writes are made, minus every
        replica those writes stop, and the writes of the gateways' own services (``mounts``:
        each gateway's secrets, with their ids)."""
        stopping = stopped_by(whole.actions)
        works = [
            GatewayWork(
                gateway=gw,
                backends=desired_backends(gw, deployments, whole.snapshot, stopping),
                replicas=running_replicas(gw, whole.snapshot),
                problem=self._problem(gw, whole.snapshot),
                from_zero=waking_models(gw, deployments),
            )
            for gw in gateways
        ]
        for work in works:
            access = work.gateway.spec.clientAccess
            if access.apiKeysSecret is not None and self.keys is not None:
                work.keys = self.keys.keys(work.gateway.metadata.namespace, access.apiKeysSecret)
            work.access = access_state(access, work.keys)
        # A refused gateway's service is left as it is (like a refused deployment's).
        allowed = [w.gateway for w in works if w.problem is None]
        actions = gateway_actions(allowed, whole.snapshot, self.instance, mounts)
        return GatewayPass(works=works, actions=actions)

    def _problem(self, gateway: ModelGateway, snapshot: SwarmSnapshot) -> tuple[str, str] | None:
        if self.credentials is None:
            return ("NotConfigured", NO_KEY)
        refused = self.policy.image_violation(
            gateway.spec.image, "spec.image"
        ) or network_violation(
            gateway.metadata.namespace, gateway.spec.network.name, snapshot, self.policy
        )
        return (REASON, refused) if refused is not None else None

    def push(self, work: GatewayPass) -> None:
        """Every replica of every gateway, at once; waits for all. A replica that cannot be
        reached is reported in its gateway's status; the pass goes on (that replica, being
        unreachable, is not serving clients either; its vllm-router's own health checks
        drop a stopped backend within interval x threshold)."""
        if self.credentials is None or self.send is None:
            return
        now = self.clock()
        live = {(r.admin_url, r.task) for item in work.works for r in item.replicas}
        self._pushed = {key: value for key, value in self._pushed.items() if key in live}
        jobs = []
        for item in work.works:
            who = identity(item.gateway)
            credential = self.credentials.credential(who)
            for replica in item.replicas:
                key = (replica.admin_url, replica.task)
                last = self._pushed.get(key)
                if last is not None and last[0] == item.state and now - last[1] < REFRESH_SECONDS:
                    continue
                target = PushTarget(replica, who.hostname, credential)
                send = self._pushers.submit(self.send, target, item.state)
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
                self._pushed[key] = (item.state, now)
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
        metrics.gateway_scales_from_zero.clear()
        metrics.gateway_replicas_ready.clear()
        for item in work.works:
            gw = item.gateway
            served = {md.spec.served_model_name: md.key for md in selected(gw, deployments)}
            status = gateway_status(
                item,
                served,
                (previous.get(gw.key) or {}).get("conditions", []),
                now,
            )
            found[gw.key] = status
            namespace, name = gw.metadata.namespace, gw.metadata.name
            for model, urls in item.backends.items():
                metrics.gateway_backends.labels(namespace, name, model).set(len(urls))
            for model in item.from_zero:
                metrics.gateway_scales_from_zero.labels(namespace, name, model).set(1)
            metrics.gateway_replicas_ready.labels(namespace, name).set(status.readyReplicas)
        return found
