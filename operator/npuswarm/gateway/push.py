"""The pass's side of ModelGateways: compute (gateway/backends.py), push each replica's
backends over TLS, hold back the writes that would stop a replica a gateway may still list,
and report their status and metrics.

The push goes to every running gateway replica's admin port, at its node's address (host
mode), over TLS checked against npuswarm's gateway CA and that gateway's own name, signed with
that gateway's own credential (gateway/protocol.py, docs/security.md). It is the full state,
so pushing twice is harmless and a restarted gateway is refilled at once.

Pushes run on the pusher's own thread, outside the pass lock (issue 25, item 4): a pass hands
each gateway replica the state it should have and goes on; a gateway whose admin port does not
answer backs off on its own and slows nobody else's pass, finalizer or node check. The order
"a replica leaves every gateway before any write stops it" holds through ``holding``: a pass
applies no write that stops a replica some gateway replica may still list (its last accepted
state lists it, a push in flight lists it, or npuswarm has not heard from it since its start);
those writes wait, and the pass that follows the acknowledgement (``on_settled``) makes them.
A gateway replica whose last push failed holds nothing: it is retried with backoff, and its
vllm-router's own health checks drop a stopped backend within interval x threshold.
"""

from __future__ import annotations

import dataclasses
import json
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
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
    Listing,
    gateway_status,
    listing,
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
# Gateway replicas long-polled at once for a held request (one each, only while a model they
# serve is at zero); more wait their turn.
HELD_WAITERS = 32
# The same state is not pushed again to the same gateway task for this long: a pass where
# nothing changed makes no call. The gateway keeps what it got; the refresh only bounds how
# long a gateway that lost it somehow (it cannot without a new task) would go without.
REFRESH_SECONDS = 60.0
# A gateway replica whose push failed is tried again after 1, 2, 4 ... seconds, at most this.
MAX_PUSH_BACKOFF_SECONDS = 60.0
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
    query: str = "",
    timeout: float = PUSH_TIMEOUT_SECONDS,
) -> tuple[int, bytes]:
    """One signed request to a gateway replica's admin port over TLS: (status, body). The
    signature covers the path, not ``query``."""
    connection = protocol.PinnedHTTPS(
        target.replica.address,
        target.replica.admin_port,
        target.hostname,
        context,
        timeout,
    )
    try:
        connection.request(
            method,
            f"{path}?{query}" if query else path,
            body=body,
            headers=signer.headers(target.credential, method, path, body),
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


def push_backoff(failures: int) -> float:
    """Seconds before a gateway replica whose last ``failures`` pushes failed is tried again."""
    return float(min(MAX_PUSH_BACKOFF_SECONDS, 2.0 ** (failures - 1)))


@dataclass(frozen=True)
class Offer:
    """One gateway in one pass: its work, what it lists, and its replicas to push to."""

    work: GatewayWork
    listing: Listing
    targets: list[PushTarget]


@dataclass
class _Replica:
    """One gateway replica (task) as the pusher knows it."""

    target: PushTarget
    state: dict[str, Any]  # what it should hold
    members: frozenset[str]  # the services ``state`` lists
    serves: frozenset[str]  # every service its gateway serves (see backends.Listing)
    accepted: dict[str, Any] | None = None
    accepted_members: frozenset[str] | None = None  # None: not heard from since our start
    accepted_at: float = 0.0
    sending: frozenset[str] | None = None  # members of the state in flight, if any
    failures: int = 0
    retry_at: float = 0.0
    error: str | None = None

    def may_list(self) -> frozenset[str]:
        if self.failures:
            return frozenset()
        listed = self.serves if self.accepted_members is None else self.accepted_members
        return listed | (self.sending or frozenset())

    def due(self, now: float) -> bool:
        if self.sending is not None or now < self.retry_at:
            return False
        return self.accepted != self.state or now - self.accepted_at >= REFRESH_SECONDS


class Pusher:
    """Keeps every gateway replica holding the state the last pass gave it, on its own
    thread, PUSH_CONCURRENCY at a time, each replica backing off on its own."""

    def __init__(self, send: Sender, clock: Callable[[], float] = time.monotonic) -> None:
        self.send = send
        self.clock = clock
        # Set by the runtime: whether this instance holds the leadership lease (a push is a
        # write: an instance that lost the lease sends nothing), and who to tell when a hold
        # may have ended or a replica got its first state.
        self.fence: Callable[[], bool] | None = None
        self.on_settled: Callable[[], None] | None = None
        self._replicas: dict[tuple[str, str], _Replica] = {}  # (admin URL, task)
        self._held: frozenset[str] = frozenset()
        self._changed = threading.Condition()
        self._stop = False
        self._senders = ThreadPoolExecutor(PUSH_CONCURRENCY, thread_name_prefix="gateway-push")
        self._thread = threading.Thread(target=self._run, name="gateway-push", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._changed:
            self._stop = True
            self._changed.notify_all()
        self._thread.join()
        self._senders.shutdown(wait=True)

    def offer(self, offers: Sequence[Offer]) -> None:
        """The state each running gateway replica should hold; returns at once. Fills each
        work's push errors and unconfigured replicas from what the pusher last heard."""
        with self._changed:
            live: dict[tuple[str, str], _Replica] = {}
            for offer in offers:
                work, listed = offer.work, offer.listing
                for target in offer.targets:
                    key = (target.replica.admin_url, target.replica.task)
                    known = self._replicas.get(key) or _Replica(
                        target, work.state, listed.members, listed.serves
                    )
                    known.target, known.state = target, work.state
                    known.members, known.serves = listed.members, listed.serves
                    live[key] = known
                    if known.error is not None:
                        work.push_errors[key[0]] = known.error
                    if known.accepted is None:
                        work.unconfigured |= {key[0]}
            self._replicas = live
            self._changed.notify_all()

    def holding(self, stopping: frozenset[str]) -> frozenset[str]:
        """Those of ``stopping`` (service names) that some gateway replica may still list:
        their writes wait. Remembered, so that the answer changing wakes a pass."""
        with self._changed:
            listed: set[str] = set()
            for replica in self._replicas.values():
                listed |= replica.may_list()
            self._held = stopping & listed
            return self._held

    def settle(self, timeout: float) -> bool:
        """Wait until every replica holds its state or has failed (tests, shutdown)."""
        deadline = self.clock() + timeout
        with self._changed:
            while any(
                r.sending is not None or (r.accepted != r.state and not r.failures)
                for r in self._replicas.values()
            ):
                left = deadline - self.clock()
                if left <= 0:
                    return False
                self._changed.wait(left)
            return True

    def _run(self) -> None:
        while True:
            with self._changed:
                if self._stop:
                    return
                now = self.clock()
                due = [(k, r) for k, r in self._replicas.items() if r.due(now)]
                fenced = bool(due) and self.fence is not None and not self.fence()
                if fenced:
                    metrics.gateway_pushes_total.labels("fenced").inc(len(due))
                    due = []
                for key, replica in due:
                    replica.sending = replica.members
                    self._senders.submit(self._push, key, replica, replica.state, replica.members)
                # Fenced: asked again soon, as the lease may be confirmed any moment.
                waits = [1.0] if fenced else []
                for r in self._replicas.values():
                    if r.sending is None and r.failures:
                        waits.append(r.retry_at - now)
                    elif r.sending is None and r.accepted is not None:
                        waits.append(r.accepted_at + REFRESH_SECONDS - now)
                self._changed.wait(max(0.05, min(waits, default=REFRESH_SECONDS)))

    def _push(
        self,
        key: tuple[str, str],
        replica: _Replica,
        state: dict[str, Any],
        members: frozenset[str],
    ) -> None:
        try:
            self.send(replica.target, state)
        except Exception as error:
            outcome, message = "error", str(error)[:300]
        else:
            outcome, message = "success", ""
        metrics.gateway_pushes_total.labels(outcome).inc()
        with self._changed:
            held_before = self._held & replica.may_list()
            first = replica.accepted is None
            replica.sending = None
            now = self.clock()
            if outcome == "success":
                replica.accepted, replica.accepted_at = state, now
                replica.accepted_members = members
                replica.failures, replica.retry_at, replica.error = 0, 0.0, None
            else:
                replica.failures += 1
                replica.retry_at = now + push_backoff(replica.failures)
                replica.error = message
                log.warning(
                    "gateway push failed",
                    replica=key[0],
                    failures=replica.failures,
                    retry_in=round(replica.retry_at - now, 1),
                    error=message,
                )
            released = held_before - replica.may_list()
            self._changed.notify_all()
        # What a pass would now do or report differently: held writes may go, a new replica
        # became configured, a replica just started failing.
        news = (first and outcome == "success") or (outcome == "error" and replica.failures == 1)
        if (released or news) and self.on_settled is not None:
            self.on_settled()


@dataclass
class GatewayPass:
    offers: list[Offer] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)  # the gateways' own services
    # The pass's writes held back: they stop a replica a gateway may still list.
    held: list[Action] = field(default_factory=list)

    @property
    def works(self) -> list[GatewayWork]:
        return [offer.work for offer in self.offers]


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
        self.pusher = Pusher(send, clock) if send is not None and credentials is not None else None
        self._readers = ThreadPoolExecutor(LOAD_CONCURRENCY, thread_name_prefix="gateway-load")
        # Long polls (``wait_for_held``) wait apart: they must not hold up the rounds' reads.
        self._waiters = ThreadPoolExecutor(HELD_WAITERS, thread_name_prefix="gateway-held")

    def close(self) -> None:
        if self.pusher is not None:
            self.pusher.close()
        self._readers.shutdown(wait=True)
        self._waiters.shutdown(wait=False, cancel_futures=True)

    def wait_for_held(
        self,
        gateways: Sequence[ModelGateway],
        deployments: Sequence[ModelDeployment],
        snapshot: SwarmSnapshot,
        seconds: float,
    ) -> bool:
        """Wait up to ``seconds`` for a request held for one of ``deployments`` (models at
        zero) at any running replica of the gateways serving them: True as soon as one is
        (each replica's GET /load?heldWait= answers when a request is held there). False
        after the wait, or when every replica answered without one (a front from before the
        long poll answers at once: the caller then waits as it did)."""
        if self.credentials is None or seconds <= 0:
            return False
        models = {md.spec.served_model_name for md in deployments}
        pending = set()
        for gateway in gateways:
            if not selected(gateway, deployments):
                continue
            credential = self.credentials.credential(identity(gateway))
            for replica in running_replicas(gateway, snapshot):
                target = PushTarget(replica, identity(gateway).hostname, credential)
                pending.add(self._waiters.submit(self._get_load, target, seconds))
        deadline = time.monotonic() + seconds + PUSH_TIMEOUT_SECONDS
        while pending:
            done, pending = wait(
                pending, timeout=max(0.0, deadline - time.monotonic()), return_when=FIRST_COMPLETED
            )
            if not done:
                return False
            for future in done:
                if future.exception() is not None:
                    continue
                merged = load.merge([future.result()])
                if any(merged[m].held for m in models if m in merged):
                    return True
        return False

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

    def _get_load(self, target: PushTarget, held_wait: float = 0.0) -> dict[str, Any]:
        assert self.credentials is not None
        status, body = admin_request(
            target,
            self.credentials.client_context(),
            self.signer,
            "GET",
            "/load",
            query=f"{load.HELD_WAIT}={held_wait:g}" if held_wait > 0 else "",
            timeout=PUSH_TIMEOUT_SECONDS + held_wait,
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
        offers = []
        for gw in gateways:
            listed = listing(gw, deployments, whole.snapshot, stopping)
            work = GatewayWork(
                gateway=gw,
                backends=listed.backends,
                replicas=running_replicas(gw, whole.snapshot),
                problem=self._problem(gw, whole.snapshot),
                from_zero=waking_models(gw, deployments),
            )
            access = gw.spec.clientAccess
            if access.apiKeysSecret is not None and self.keys is not None:
                work.keys = self.keys.keys(gw.metadata.namespace, access.apiKeysSecret)
            work.access = access_state(access, work.keys)
            offers.append(Offer(work, listed, self._targets(work)))
        # A refused gateway's service is left as it is (like a refused deployment's).
        allowed = [o.work.gateway for o in offers if o.work.problem is None]
        actions = gateway_actions(allowed, whole.snapshot, self.instance, mounts)
        return GatewayPass(offers=offers, actions=actions)

    def _targets(self, work: GatewayWork) -> list[PushTarget]:
        if self.credentials is None:
            return []
        who = identity(work.gateway)
        credential = self.credentials.credential(who)
        return [PushTarget(replica, who.hostname, credential) for replica in work.replicas]

    def _problem(self, gateway: ModelGateway, snapshot: SwarmSnapshot) -> tuple[str, str] | None:
        if self.credentials is None:
            return ("NotConfigured", NO_KEY)
        refused = self.policy.image_violation(
            gateway.spec.image, "spec.image"
        ) or network_violation(
            gateway.metadata.namespace, gateway.spec.network.name, snapshot, self.policy
        )
        return (REASON, refused) if refused is not None else None

    def offer(self, work: GatewayPass) -> None:
        """Hand every gateway replica its state (pushed on the pusher's thread)."""
        if self.pusher is not None:
            self.pusher.offer(work.offers)

    def holding(self, stopping: frozenset[str]) -> frozenset[str]:
        """Services of ``stopping`` whose stop must wait: a gateway may still list them."""
        return self.pusher.holding(stopping) if self.pusher is not None else frozenset()

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
