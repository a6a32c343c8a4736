"""ModelGateways in a pass: the backends each must hold, where each replica is pushed to, and
their status. Pure: gateway/push.py sends what is computed here; the gateways' own services
and secrets are gateway/service.py's.

A gateway's backends are the replicas that are ready now and that this pass does not stop:
the same function gives the state pushed before the pass's writes (so a replica leaves
every gateway before its task is stopped) and the state after them (a new or updated
replica joins in the pass that first sees its task running, i.e. healthy).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from pydantic import ValidationError

from npuswarm.api import labels
from npuswarm.api.deployment import ModelDeployment
from npuswarm.api.gateway import (
    ClientAccessStatus,
    GatewayModelStatus,
    ModelGateway,
    ModelGatewayStatus,
)
from npuswarm.api.meta import walk_index
from npuswarm.core.diff import Action
from npuswarm.core.snapshot import ObservedService, SwarmSnapshot
from npuswarm.core.status import AS_EXPECTED, ConditionSet, ConditionValue
from npuswarm.gateway.access import KeySet

log = structlog.get_logger("npuswarm.gateway")
# Backends per model, as pushed: {model: [url, ...]}.
Backends = dict[str, list[str]]


def selected(
    gateway: ModelGateway, deployments: Iterable[ModelDeployment]
) -> list[ModelDeployment]:
    """The deployments a gateway serves: its namespace, its selector (empty: all), and on its
    network (elsewhere it could not reach them), or multi-node replicas, which are on the
    host network and reached at their leader's node address (docs/multi-node.md)."""
    wanted = gateway.spec.modelSelector.matchLabels
    return sorted(
        (
            md
            for md in deployments
            if md.metadata.namespace == gateway.metadata.namespace
            and all(md.metadata.labels.get(k) == v for k, v in wanted.items())
            and (
                md.spec.multi_node
                or (
                    md.spec.network is not None
                    and md.spec.network.name == gateway.spec.network.name
                )
            )
        ),
        key=lambda md: md.key,
    )


def stopped_by(actions: Iterable[Action]) -> frozenset[str]:
    """Services whose running task this pass's writes stop: every removal, and every update
    (npuswarm's updates change the task template, so Swarm replaces the task)."""
    return frozenset(a.service_name for a in actions if a.kind in ("remove", "update"))


def replica_url(md: ModelDeployment, service: ObservedService, network: str) -> str | None:
    """The ready replica's address on the gateway's network; None if it is not ready."""
    task = service.newest_task
    if task is None or not service.running_current_spec:
        return None
    address = task.address_on(network)
    return f"http://{address}:{md.spec.engine.port}" if address else None


@dataclass(frozen=True)
class Listing:
    """What one gateway is to list after this pass's writes, and which services that means."""

    backends: Backends
    # The services whose replicas ``backends`` lists.
    members: frozenset[str]
    # Every service of the deployments the gateway serves, listed or not: what a gateway
    # replica whose state npuswarm does not know (since its start) may still list.
    serves: frozenset[str]


def listing(
    gateway: ModelGateway,
    deployments: Iterable[ModelDeployment],
    snapshot: SwarmSnapshot,
    stopping: frozenset[str],
) -> Listing:
    """Every served model name of the selected deployments, with its ready replicas' URLs
    (task IPs, not VIPs: per replica, exact, and they work without IPVS). A model with no
    ready replica is listed with none, so the gateway answers 503 for it, not 404."""
    network = gateway.spec.network.name
    backends: Backends = {}
    members: set[str] = set()
    serves: set[str] = set()
    for md in selected(gateway, deployments):
        urls = backends.setdefault(md.spec.served_model_name, [])
        if md.spec.multi_node:
            services = snapshot.services_of(md.key)
            serves.update(s.name for s in services)
            for url, names in group_backends(services, snapshot, stopping).items():
                urls.append(url)
                members.update(names)
            continue
        for service in snapshot.services_of(md.key):
            serves.add(service.name)
            if service.name in stopping:
                continue
            address = replica_url(md, service, network)
            if address is not None:
                urls.append(address)
                members.add(service.name)
    return Listing(
        backends={model: sorted(set(urls)) for model, urls in sorted(backends.items())},
        members=frozenset(members),
        serves=frozenset(serves),
    )


def desired_backends(
    gateway: ModelGateway,
    deployments: Iterable[ModelDeployment],
    snapshot: SwarmSnapshot,
    stopping: frozenset[str],
) -> Backends:
    return listing(gateway, deployments, snapshot, stopping).backends


def group_backends(
    services: Sequence[ObservedService], snapshot: SwarmSnapshot, stopping: frozenset[str]
) -> dict[str, list[str]]:
    """Each ready group's leader, ``http://<leader node address>:<API port>``: only the leader
    serves the API. A group is out as soon as one member is not running its current spec,
    is on a node that is not ready, or is stopped by this pass's writes: a group missing a
    member cannot serve, and its leader must leave every gateway before any member stops."""
    by_group: dict[str, list[ObservedService]] = {}
    for service in services:
        by_group.setdefault(service.slot.partition("-m")[0], []).append(service)
    urls: dict[str, list[str]] = {}
    for members in by_group.values():
        leader = next((s for s in members if s.slot.endswith("-m0")), None)
        if leader is None or any(not _serving(s, snapshot, stopping) for s in members):
            continue
        node = snapshot.node(leader.labels.get(labels.NODE, ""))
        port = _api_port(leader)
        if node is not None and node.addr and port is not None:
            urls[f"http://{node.addr}:{port}"] = [s.name for s in members]
    return urls


def _serving(service: ObservedService, snapshot: SwarmSnapshot, stopping: frozenset[str]) -> bool:
    node = snapshot.node(service.labels.get(labels.NODE, ""))
    return (
        service.name not in stopping
        and service.running_current_spec
        and node is not None
        and node.state == "ready"
    )


def _api_port(service: ObservedService) -> int | None:
    """The --port the leader's engine serves on, as its service runs it."""
    args = ((service.spec.get("TaskTemplate") or {}).get("ContainerSpec") or {}).get("Args") or []
    for flag, value in itertools.pairwise(args):
        if flag == "--port" and str(value).isdigit():
            return int(value)
    return None


# --- where each replica is pushed to, and the status ----------------------------------------


@dataclass(frozen=True)
class GatewayReplica:
    node: str  # hostname, for the status
    address: str  # the node's address: the admin port is published there (host mode)
    admin_port: int
    endpoint: str  # <node address>:<port>
    task: str = ""  # a restarted gateway is a new task: it must be pushed to again

    @property
    def admin_url(self) -> str:
        return f"https://{self.address}:{self.admin_port}"


def running_replicas(gateway: ModelGateway, snapshot: SwarmSnapshot) -> list[GatewayReplica]:
    """The gateway's running tasks, each reached at its node's address: the admin port is
    published in host mode, the only way to reach one given replica from outside Swarm."""
    found: list[GatewayReplica] = []
    for service in snapshot.gateway_services:
        if service.gateway != gateway.key:
            continue
        for task in service.tasks:
            if task.state != "running" or task.desired_state != "running" or not task.node_id:
                continue
            node = snapshot.node(task.node_id)
            if node is None or not node.addr:
                continue
            found.append(
                GatewayReplica(
                    node=node.hostname or node.id,
                    address=node.addr,
                    admin_port=gateway.spec.adminPort,
                    endpoint=f"{node.addr}:{gateway.spec.port}",
                    task=task.id,
                )
            )
    return sorted(found, key=lambda r: r.admin_url)


@dataclass
class GatewayWork:
    """One gateway in one pass: the state to push, and where."""

    gateway: ModelGateway
    backends: Backends
    replicas: list[GatewayReplica]
    # admin URL -> the error of its last refused or failed push (filled by gateway/push.py).
    push_errors: dict[str, str] = field(default_factory=dict)
    # Admin URLs of replicas that have accepted no push yet (a new gateway task).
    unconfigured: frozenset[str] = frozenset()
    # Why the operator does not run this gateway, if so: (condition reason, message).
    problem: tuple[str, str] | None = None
    # Client access as pushed (gateway/access.py), and the keys it came from: None when the
    # gateway asks for keys whose Secret could not be read.
    access: dict[str, Any] = field(default_factory=dict)
    keys: KeySet | None = None
    # The served models a request wakes (waking_models).
    from_zero: list[str] = field(default_factory=list)

    @property
    def state(self) -> dict[str, Any]:
        """What a push carries: the full state of one gateway. ``scaleFromZero`` came with
        scale to zero; a front from before ignores it (and answers 503 as it did)."""
        return {
            "models": self.backends,
            "access": self.access,
            "scaleFromZero": scale_from_zero(self.gateway, self.from_zero),
        }


def waking_models(gateway: ModelGateway, deployments: Iterable[ModelDeployment]) -> list[str]:
    """The served model names of the gateway's deployments that scale to zero: a request
    for one is held while a replica starts, instead of answered 503."""
    return sorted(
        {
            md.spec.served_model_name
            for md in selected(gateway, deployments)
            if md.spec.autoscaling is not None and md.spec.autoscaling.minReplicas == 0
        }
    )


def scale_from_zero(gateway: ModelGateway, models: Sequence[str]) -> dict[str, Any]:
    """The hold settings a gateway replica gets with its backends."""
    hold = gateway.spec.scaleFromZero
    return {
        "models": list(models),
        "maxWaitSeconds": hold.maxWaitSeconds,
        "maxQueuedRequests": hold.maxQueuedRequests,
        "retryAfterSeconds": hold.retryAfterSeconds,
    }


def gateway_status(
    work: GatewayWork,
    deployments: Mapping[str, str],  # served model name -> deployment key
    previous_conditions: Sequence[dict[str, Any]],
    now: datetime,
) -> ModelGatewayStatus:
    """Ready: every replica runs and holds the pushed backends. A served model with no
    ready backend makes the gateway Degraded (it answers 503 for that model). The phase and
    the conditions follow by the deployments' rules (core/status.py, ConditionSet); a
    gateway has no placement, so its phase is the standing (never Progressing)."""
    gateway = work.gateway
    desired = gateway.spec.replicas
    configured = [
        r
        for r in work.replicas
        if r.admin_url not in work.push_errors and r.admin_url not in work.unconfigured
    ]
    verdict = _conditions(work, len(configured))
    secret = gateway.spec.clientAccess.apiKeysSecret
    return ModelGatewayStatus.model_construct(
        observedGeneration=gateway.metadata.generation,
        phase=verdict.standing(),
        endpoint=", ".join(r.endpoint for r in work.replicas) or None,
        replicas=desired,
        readyReplicas=len(configured),
        models=[
            GatewayModelStatus.model_construct(
                model=model, deployment=deployments.get(model, ""), backends=list(urls)
            )
            for model, urls in sorted(work.backends.items())
        ],
        clientAccess=None
        if secret is None
        else ClientAccessStatus.model_construct(
            keys=len(work.keys.digests) if work.keys else 0,
            secretVersion=work.keys.version if work.keys else None,
        ),
        conditions=verdict.conditions(previous_conditions, gateway.metadata.generation, now),
    )


def _conditions(work: GatewayWork, configured: int) -> ConditionSet:
    desired = work.gateway.spec.replicas
    # A model that scales from zero has no backend as its normal state at zero: its requests
    # are held while a replica starts, so the gateway is not degraded by it.
    idle = sorted(
        model for model, urls in work.backends.items() if not urls and model not in work.from_zero
    )
    degraded = AS_EXPECTED
    problem = work.problem
    if problem is not None:
        ready = ConditionValue("False", *problem)
        degraded = ConditionValue("True", *problem)
    elif work.push_errors:
        message = "; ".join(f"{url}: {err}" for url, err in sorted(work.push_errors.items()))
        ready = ConditionValue("False", "PushFailed", message)
    elif configured < desired:
        ready = ConditionValue(
            "False", "ReplicasNotReady", f"{configured}/{desired} gateway replicas ready"
        )
    else:
        ready = ConditionValue("True", "Ready", f"{configured}/{desired} replicas ready")
    if idle and problem is None:
        degraded = ConditionValue(
            "True", "ModelWithoutBackend", "no ready replica of " + ", ".join(idle)
        )
    secret = work.gateway.spec.clientAccess.apiKeysSecret
    if secret is not None and work.keys is None and problem is None:
        degraded = ConditionValue(
            "True",
            "ApiKeysUnavailable",
            f"the API keys Secret {secret} does not exist or cannot be read: no key is accepted",
        )
    progressing = (
        ConditionValue("True", "ReplicasStarting", ready.message)
        if ready.status == "False" and problem is None
        else AS_EXPECTED
    )
    return ConditionSet(ready, progressing, degraded)


def parse_gateways(
    index: Mapping[Any, Any], written: Mapping[str, dict[str, Any]]
) -> tuple[list[ModelGateway], dict[str, dict[str, Any]]]:
    """kopf's index of ModelGateways -> the valid ones not being deleted, and each one's last
    status (what this operator wrote, else what the API server has). The CRD schema refuses
    what the model refuses, so an invalid one is only logged and skipped."""
    gateways: list[ModelGateway] = []
    previous: dict[str, dict[str, Any]] = {}
    for entry in walk_index(index, written):
        previous[entry.key] = entry.previous
        if entry.metadata.get("deletionTimestamp"):
            continue
        try:
            gateways.append(
                ModelGateway.model_validate(
                    {"metadata": dict(entry.metadata), "spec": dict(entry.spec)}
                )
            )
        except ValidationError as error:
            log.warning("invalid ModelGateway skipped", gateway=entry.key, error=str(error))
    return sorted(gateways, key=lambda g: g.key), previous
