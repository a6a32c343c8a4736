"""ModelGateways in a pass: the backends each must hold, where each replica is pushed to, and
their status. Pure: gateway/push.py sends what is computed here; the gateways' own services
and secrets are gateway/service.py's.

A gateway's backends are the replicas that are ready now and that this pass does not stop:
the same function gives the state pushed before the pass's writes (so a replica leaves
every gateway before its task is stopped) and the state after them (a new or updated
replica joins in the pass that first sees its task running, i.e. healthy).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from pydantic import ValidationError

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
    network (elsewhere it could not reach them)."""
    wanted = gateway.spec.modelSelector.matchLabels
    return sorted(
        (
            md
            for md in deployments
            if md.metadata.namespace == gateway.metadata.namespace
            and all(md.metadata.labels.get(k) == v for k, v in wanted.items())
            and md.spec.network is not None
            and md.spec.network.name == gateway.spec.network.name
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


def desired_backends(
    gateway: ModelGateway,
    deployments: Iterable[ModelDeployment],
    snapshot: SwarmSnapshot,
    stopping: frozenset[str],
) -> Backends:
    """Every served model name of the selected deployments, with its ready replicas' URLs
    (task IPs, not VIPs: per replica, exact, and they work without IPVS). A model with no
    ready replica is listed with none, so the gateway answers 503 for it, not 404."""
    network = gateway.spec.network.name
    backends: Backends = {}
    for md in selected(gateway, deployments):
        urls = backends.setdefault(md.spec.served_model_name, [])
        for service in snapshot.services_of(md.key):
            if service.name in stopping:
                continue
            url = replica_url(md, service, network)
            if url is not None:
                urls.append(url)
    return {model: sorted(set(urls)) for model, urls in sorted(backends.items())}


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
    # admin URL -> the error of a refused or failed push (filled by gateway/push.py).
    push_errors: dict[str, str] = field(default_factory=dict)
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
    configured = [r for r in work.replicas if r.admin_url not in work.push_errors]
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
