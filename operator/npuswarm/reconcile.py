"""One pass for the whole Swarm: observe once, place every deployment, diff them all, apply
the writes, and compute every deployment's status and events.

Passes never overlap (one lock, shared with deletion), so no NPU can be handed out twice and
a deletion can never be undone by a pass that was already running.
"""

from __future__ import annotations

import gc
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any, Protocol

import structlog

from npuswarm import metrics
from npuswarm.api import deployment as deployment_api
from npuswarm.api import gateway as gateway_api
from npuswarm.api import labels
from npuswarm.api.gateway import ModelGatewayStatus
from npuswarm.api.meta import split_key
from npuswarm.core.clock import utcnow
from npuswarm.core.diff import Action, Applied, PassPlan, hold_writes, reported_services
from npuswarm.core.groups import GroupTracker
from npuswarm.core.nodes import NodeLimits
from npuswarm.core.pipeline import DeploymentView, Desired, plan_pass, report
from npuswarm.core.render import Renderer, network_labels
from npuswarm.core.snapshot import SwarmSnapshot, is_own, secrets_from_engine
from npuswarm.core.status import npu_states
from npuswarm.gateway.backends import stopped_by
from npuswarm.gateway.push import GatewayPass, Gateways
from npuswarm.gateway.service import GatewaySecrets, SecretMount, plan_secrets
from npuswarm.settings import Settings
from npuswarm.swarm import SwarmRejected

log = structlog.get_logger("npuswarm.reconcile")
MAX_TOMBSTONES = 10_000


class SwarmAPI(Protocol):
    """What a pass needs of Swarm: the real manager (swarm.Swarm) or an in-memory one."""

    def observe(self) -> SwarmSnapshot: ...
    def create_service(self, spec: dict[str, Any]) -> str: ...
    def update_service(self, service_id: str, version: int, spec: dict[str, Any]) -> None: ...
    def remove_service(self, service_id: str) -> None: ...
    def create_network(self, name: str, network_labels: dict[str, str]) -> None: ...
    def remove_network(self, network_id: str) -> None: ...
    def owned_services(self, namespace: str, name: str) -> list[dict[str, Any]]: ...
    def services_labelled(self, *label: str) -> list[dict[str, Any]]: ...
    def secrets_labelled(self, *label: str) -> list[dict[str, Any]]: ...
    def create_secret(self, name: str, data: bytes, secret_labels: dict[str, str]) -> str: ...
    def remove_secret(self, secret_id: str) -> None: ...


# Node checks' answer for one observation: nodes and NPUs kept out of placement.
NodeChecks = Callable[[SwarmSnapshot], NodeLimits]


class OwnerCatalog(Protocol):
    """A complete read of which ModelDeployments (or ModelGateways) exist, asked only when
    services look orphaned."""

    def existing(self, owners: set[str], plural: str = deployment_api.PLURAL) -> set[str] | None:
        """Those of ``owners`` (``namespace/name``) that exist; None when that is not known."""
        ...


@dataclass
class PassResult:
    plan: PassPlan
    views: dict[str, DeploymentView]
    orphans_removed: list[Action] = field(default_factory=list)
    gateways: dict[str, ModelGatewayStatus] = field(default_factory=dict)
    # Seconds spent in each phase of the pass (observe, plan, gateways, apply, report).
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def requeue(self) -> bool:
        return any(view.requeue for view in self.views.values())

    @property
    def writes(self) -> int:
        return sum(len(v.applied) for v in self.views.values()) + len(self.orphans_removed)

    def npu_states(self) -> dict[tuple[str, str], int]:
        return npu_states(
            self.plan.snapshot, self.plan.placement.foreign, self.all_applied(), self.plan.limits
        )

    def all_applied(self) -> list[Action]:
        return [a for v in self.views.values() for a in v.applied] + self.orphans_removed


class Reconciler:
    def __init__(
        self,
        swarm: SwarmAPI,
        settings: Settings,
        clock: Callable[[], datetime] = utcnow,
        owners: OwnerCatalog | None = None,
        gateways: Gateways | None = None,
    ) -> None:
        self.swarm = swarm
        self.gateways = gateways
        self.settings = settings
        self.clock = clock
        self.owners = owners
        self.lock = threading.Lock()
        self.renderer = Renderer(
            settings.instance, settings.stop_grace_seconds, settings.hccl_interface
        )
        self.policy = settings.tenant_policy()
        # Multi-node replicas that keep failing back off (core/groups.py).
        self.groups = GroupTracker(settings.group_rules())
        # uids of deleted deployments and gateways: no pass may write for them again, even one
        # that read its desired state before the deletion.
        self._tombstones: OrderedDict[str, None] = OrderedDict()
        self.last_plan: PassPlan | None = None
        self._writers = ThreadPoolExecutor(
            max_workers=max(1, settings.write_concurrency), thread_name_prefix="swarm-write"
        )

    def close(self) -> None:
        self._writers.shutdown(wait=True)
        if self.gateways is not None:
            self.gateways.close()

    def plan(self, desired: Desired, checks: NodeChecks | None = None) -> PassPlan:
        """Observe and plan every deployment; writes nothing (also `npuswarm plan`).
        ``checks``: which observed nodes and NPUs get no new replica (node validation, NPU
        health; docs/node-health.md)."""
        snapshot = self.swarm.observe()
        return self._plan(desired, snapshot, checks(snapshot) if checks else None)

    def _plan(
        self,
        desired: Desired,
        snapshot: SwarmSnapshot,
        limits: NodeLimits | None = None,
    ) -> PassPlan:
        confirmed, unconfirmed = self._orphan_owners(desired, snapshot)
        whole = plan_pass(
            desired.deployments,
            snapshot,
            now=self.clock(),
            lost_node_grace_seconds=self.settings.lost_node_grace_seconds,
            known_services={
                key: reported_services(status) for key, status in desired.previous.items()
            },
            orphan_owners=confirmed,
            renderer=self.renderer,
            limits=limits,
            policy=self.policy,
            group_tracker=self.groups,
            port_range=self.settings.port_range(),
            quotas=desired.quotas,
        )
        if unconfirmed:
            whole.unconfirmed_orphans = unconfirmed
        return whole

    def run_pass(self, desired: Desired, checks: NodeChecks | None = None) -> PassResult:
        """Raises SwarmUnavailable when Swarm cannot be read or written: nothing is concluded
        from a failed read, so nothing is removed; the caller retries with backoff."""
        with self.lock:
            clock = PhaseClock()
            with _collector_paused():
                desired = self._without_tombstoned(desired)
                snapshot = self.swarm.observe()
                clock.lap("observe")
                whole = self._plan(desired, snapshot, checks(snapshot) if checks else None)
                clock.lap("plan")
            # Until this pass's writes are all made, no plan says which NPUs are free: node
            # checks must not take NPUs that a write of a pass failing part-way gave away.
            self.last_plan = None
            secrets = self._gateway_secrets(desired)
            gateway_pass = self._gateways_first(desired, whole, secrets)
            clock.lap("gateways")
            # Writes wait on Swarm, while the rest of the process goes on making garbage:
            # the collector runs meanwhile.
            self._create_networks(whole.networks_to_create)
            applied = self._apply(whole.actions + gateway_pass.actions)
            count_preemptions(whole, applied)
            kept = {gateway.spec.network.name for gateway in desired.gateways}
            gone = [network_id for name, network_id in whole.networks_to_remove if name not in kept]
            self._remove_networks(gone)
            self._remove_secrets([s.id for s in secrets.stale])
            self._remove_orphan_gateways(desired, whole.snapshot)
            self.groups.remember(whole.groups, gateway_pass.held)
            clock.lap("apply")
            # Node probes read it under the same lock: they take only NPUs this pass left free.
            self.last_plan = whole
            with _collector_paused():
                result = self._result(desired, whole, applied)
            if self.gateways is not None:
                result.gateways = self.gateways.statuses(
                    gateway_pass, desired.deployments, desired.gateway_previous, self.clock()
                )
            clock.lap("report")
            result.timings = clock.laps
            return result

    def _gateway_secrets(self, desired: Desired) -> GatewaySecrets:
        """Each gateway's credential and TLS secrets, made before its service is written;
        the ids of their secrets by name come back in ``mounts``."""
        credentials = self.gateways.credentials if self.gateways is not None else None
        if credentials is None or not desired.gateways:
            return GatewaySecrets()
        observed = secrets_from_engine(
            self.swarm.secrets_labelled(labels.OWNED_FILTER, labels.SECRET_KIND),
            self.settings.instance,
        )
        plan = plan_secrets(
            desired.gateways, observed, credentials, self.settings.instance, self.clock()
        )
        ids = {secret.name: secret.id for secret in observed}
        for new in plan.create:
            try:
                ids[new.name] = self.swarm.create_secret(new.name, new.data, new.labels)
            except SwarmRejected as error:
                log.warning("gateway secret refused", secret=new.name, error=str(error))
                continue
            log.info("gateway secret created", secret=new.name)
        return GatewaySecrets(mounts=dict(plan.resolved(ids)), stale=plan.stale)

    def _gateways_first(
        self, desired: Desired, whole: PassPlan, secrets: GatewaySecrets
    ) -> GatewayPass:
        """Every gateway is handed its backends (without the replicas this pass's writes
        stop, with those that became ready), and the writes that would stop a replica some
        gateway may still list wait for a later pass (gateway/push.py)."""
        if self.gateways is None:
            return GatewayPass()
        mounts: dict[str, tuple[SecretMount, ...]] = secrets.mounts
        gateway_pass = self.gateways.prepare(desired.gateways, desired.deployments, whole, mounts)
        self.gateways.offer(gateway_pass)
        held = self.gateways.holding(stopped_by(whole.actions))
        if held:
            gateway_pass.held = hold_writes(whole, held)
            log.info("writes wait for gateways to drop their replicas", services=sorted(held))
        metrics.gateway_held_writes.set(len(held))
        return gateway_pass

    def _remove_secrets(self, secret_ids: list[str]) -> None:
        """Secrets no gateway mounts any more. Swarm refuses to remove one a service still
        names (a rolling update not yet written): kept, and tried again by a later pass."""
        for secret_id in secret_ids:
            try:
                self.swarm.remove_secret(secret_id)
            except SwarmRejected as error:
                log.info("gateway secret kept", secret=secret_id, reason=str(error))

    def _create_networks(self, networks: Mapping[str, str]) -> None:
        """Networks go before the services that attach to them, each marked with the namespace
        it is created for (docs/security.md, "Networks")."""
        for name, namespace in networks.items():
            marks = network_labels(self.settings.instance) | {labels.NETWORK_NAMESPACE: namespace}
            self._network_write(name, "created", partial(self.swarm.create_network, name, marks))

    def _remove_networks(self, network_ids: list[str]) -> None:
        """Networks go after the last service that used them."""
        for target in network_ids:
            self._network_write(target, "removed", partial(self.swarm.remove_network, target))

    def _network_write(self, target: str, done: str, write: Callable[[], None]) -> None:
        """A refusal (e.g. a network still in use by someone else's service) is logged: the
        services that need a missing network say so in their own status."""
        try:
            write()
        except SwarmRejected as error:
            log.warning("network write refused", network=target, error=str(error))
            return
        log.info(f"network {done}", network=target)

    def _result(self, desired: Desired, whole: PassPlan, applied: dict[str, Applied]) -> PassResult:
        views = report(desired, whole, applied, self.clock())
        orphans = [a for owner in {o.owner for o in whole.orphans} for a in applied[owner].done]
        for action in orphans:
            log.info("orphan removed", service=action.service_name, reason=action.reason)
        return PassResult(plan=whole, views=views, orphans_removed=orphans)

    def _orphan_owners(
        self, desired: Desired, snapshot: SwarmSnapshot
    ) -> tuple[frozenset[str], frozenset[str]]:
        """(confirmed, unconfirmed): owners of services that no ModelDeployment claims,
        confirmed gone by a complete read, and those a failed or partial read could not
        confirm. Only confirmed ones are removed."""
        candidates = frozenset(
            owner for owner in snapshot.deployments() - desired.known() if desired.watches(owner)
        )
        if not candidates or self.owners is None:
            return frozenset(), frozenset()
        existing = self.owners.existing(set(candidates))
        if existing is None:
            return frozenset(), candidates
        return candidates - existing, frozenset()

    def _without_tombstoned(self, desired: Desired) -> Desired:
        if not self._tombstones:
            return desired
        alive = [md for md in desired.deployments if md.metadata.uid not in self._tombstones]
        gateways = [gw for gw in desired.gateways if gw.metadata.uid not in self._tombstones]
        if len(alive) == len(desired.deployments) and len(gateways) == len(desired.gateways):
            return desired
        gone = {md.key for md in desired.deployments} - {md.key for md in alive}
        return Desired(
            deployments=alive,
            invalid=desired.invalid,
            deleting=desired.deleting | gone,
            previous=desired.previous,
            namespaces=desired.namespaces,
            gateways=gateways,
            gateway_previous=desired.gateway_previous,
        )

    def _remove_orphan_gateways(self, desired: Desired, snapshot: SwarmSnapshot) -> None:
        """Services (and secrets) of this installation's gateways that no ModelGateway in the
        index claims and that a complete LIST confirms gone (deleted while no operator ran its
        finalizer): as orphans of deployments are, never on a guess from the index alone."""
        claimed = {gw.key for gw in desired.gateways}
        candidates = {
            s.gateway
            for s in snapshot.gateway_services
            if s.gateway not in claimed
            and desired.watches(s.gateway)
            and is_own(s.labels, self.settings.instance)
        }
        if not candidates or self.owners is None:
            return
        existing = self.owners.existing(candidates, gateway_api.PLURAL)
        if existing is None:
            return
        for key in sorted(candidates - existing):
            removed = self._remove_gateway(*split_key(key))
            log.info("orphan gateway removed", gateway=key, services=removed)

    def _apply(self, actions: list[Action]) -> dict[str, Applied]:
        """Every write of the pass, a bounded number at a time: within a pass no write depends
        on another (NPUs freed by a removal are only handed out by a later pass). A refused
        write is reported for its replica and the rest go on; SwarmUnavailable propagates once
        all started writes have ended."""
        futures = [(action, self._writers.submit(self._write, action)) for action in actions]
        applied: dict[str, Applied] = {}
        unavailable: Exception | None = None
        for action, future in futures:
            owner = action.owner
            record = applied.setdefault(owner, Applied())
            try:
                future.result()
            except SwarmRejected as error:
                record.rejected[action.slot] = str(error)
                log.warning(
                    "swarm refused a write",
                    deployment=owner,
                    action=action.kind,
                    service=action.service_name,
                    error=str(error),
                )
                continue
            except Exception as error:
                unavailable = unavailable or error
                continue
            record.done.append(action)
            if action.drift is not None:
                metrics.drift_corrections_total.labels(action.drift).inc()
            log.info(
                "service written",
                deployment=owner,
                action=action.kind,
                service=action.service_name,
                reason=action.reason,
            )
        if unavailable is not None:
            raise unavailable
        return applied

    def _write(self, action: Action) -> None:
        if action.kind == "create":
            assert action.spec is not None
            self.swarm.create_service(action.spec)
        elif action.kind == "update":
            assert action.spec is not None and action.service_id is not None
            self.swarm.update_service(action.service_id, action.version or 0, action.spec)
        else:
            assert action.service_id is not None
            self.swarm.remove_service(action.service_id)

    def finalize(self, namespace: str, name: str, uid: str) -> int:
        """Remove every service this deployment owns (found by label, never by name), after
        any running pass ended; no later pass writes for this uid again."""
        with self.lock:
            self._tombstone(uid)
            owned = [
                s
                for s in self.swarm.owned_services(namespace, name)
                if not uid
                or (s.get("Spec", {}).get("Labels") or {}).get(labels.OWNER_UID, uid) == uid
            ]
            for service in owned:
                self.swarm.remove_service(service["ID"])
        return len(owned)

    def finalize_gateway(self, namespace: str, name: str, uid: str = "") -> int:
        """Remove a deleted ModelGateway's services and then its secrets (found by label),
        after any running pass ended; no later pass writes for this uid again."""
        with self.lock:
            self._tombstone(uid)
            return self._remove_gateway(namespace, name)

    def _remove_gateway(self, namespace: str, name: str) -> int:
        owner = (
            labels.OWNED_FILTER,
            f"{labels.GATEWAY_NAMESPACE}={namespace}",
            f"{labels.GATEWAY_NAME}={name}",
        )
        found = self.swarm.services_labelled(*owner)
        gone = [
            s["ID"] for s in found if is_own(s["Spec"].get("Labels") or {}, self.settings.instance)
        ]
        for service_id in gone:
            self.swarm.remove_service(service_id)
        for secret in secrets_from_engine(
            self.swarm.secrets_labelled(*owner), self.settings.instance
        ):
            self.swarm.remove_secret(secret.id)
        return len(gone)

    def _tombstone(self, uid: str) -> None:
        if uid:
            self._tombstones[uid] = None
            while len(self._tombstones) > MAX_TOMBSTONES:
                self._tombstones.popitem(last=False)


def count_preemptions(whole: PassPlan, applied: Mapping[str, Applied]) -> None:
    """npuswarm_preemptions_total: victims whose service this pass did remove."""
    for preemption in whole.preemptions:
        for victim in preemption.victims:
            slots = {key[1] for key in victim.keys}
            done = applied.get(victim.deployment, Applied()).done
            if any(a.kind == "remove" and a.slot in slots for a in done):
                log.info(
                    "replica preempted",
                    deployment=victim.deployment,
                    replica=victim.replica,
                    by=f"{preemption.deployment}[{preemption.replica}]",
                    nodes=list(preemption.nodes),
                )
                metrics.preemptions_total.labels(split_key(victim.deployment)[0]).inc()


class PhaseClock:
    """Seconds between laps, by phase name."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.monotonic()

    def lap(self, phase: str) -> None:
        now = time.monotonic()
        self.laps[phase] = round(now - self._last, 4)
        self._last = now


@contextmanager
def _collector_paused() -> Iterator[None]:
    """A pass allocates about a million short-lived objects (the Engine JSON) and frees them
    by reference counting; the cyclic collector would walk them all several times for
    nothing, which measured as more than half of a pass's CPU at 2,000 deployments. Only
    around computation: the pause is process-wide, and a long pause lets other threads'
    cyclic garbage pile up."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
