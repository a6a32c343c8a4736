"""ModelGateways in a pass: their Swarm services, the backends each must hold, their status.
Pure: gateway_push.py sends what is computed here, reconcile.py writes the services.

A gateway's backends are the replicas that are ready now and that this pass does not stop:
the same function gives the state pushed before the pass's writes (so a replica leaves
every gateway before its task is stopped) and the state after them (a new or updated
replica joins in the pass that first sees its task running, i.e. healthy).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import structlog
from pydantic import ValidationError

from npuswarm import gateway_protocol
from npuswarm.api import labels
from npuswarm.api.deployment import ModelDeployment
from npuswarm.api.gateway import GatewayModelStatus, ModelGateway, ModelGatewayStatus
from npuswarm.api.meta import ConditionType
from npuswarm.core.diff import Action
from npuswarm.core.render import SECOND_NS, health_command, network_labels
from npuswarm.core.snapshot import ObservedSecret, ObservedService, SwarmSnapshot
from npuswarm.core.status import ConditionValue, conditions
from npuswarm.gateway_credentials import (
    ROTATE_ANNOTATION,
    TLS_RENEW_BEFORE,
    Credentials,
    GatewayIdentity,
)

log = structlog.get_logger("npuswarm.gateway")
ROUTER_PORT = 30000
ROUTER_METRICS_PORT = 29000
MAX_SERVICE_NAME = 63
# The gateway image's user (Dockerfile.gateway): it alone may read the mounted secrets.
GATEWAY_UID = "10001"
SECRET_PREFIX_LENGTH = 40  # of the service name, in a secret's name (Swarm allows 64)
GatewayPhase = Literal["Pending", "Ready", "Degraded"]
# Backends per model, as pushed: {model: [url, ...]}.
Backends = dict[str, list[str]]


def gateway_key(gateway: ModelGateway) -> str:
    return f"gateway:{gateway.key}"


def identity(gateway: ModelGateway) -> GatewayIdentity:
    meta = gateway.metadata
    return GatewayIdentity(
        meta.namespace, meta.name, meta.uid, meta.annotations.get(ROTATE_ANNOTATION, "")
    )


def service_name(gateway: ModelGateway) -> str:
    name = f"{gateway.metadata.namespace}-{gateway.metadata.name}-gateway"
    if len(name) <= MAX_SERVICE_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: MAX_SERVICE_NAME - 9]}-{digest}"


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


# --- the gateway's own Swarm service --------------------------------------------------------


def gateway_labels(gateway: ModelGateway, instance: str) -> dict[str, str]:
    """npuswarm's marks (managed-by, instance) and the gateway's name, but no owner labels:
    a gateway's service is no replica of any deployment."""
    return network_labels(instance) | {
        labels.GATEWAY_NAMESPACE: gateway.metadata.namespace,
        labels.GATEWAY_NAME: gateway.metadata.name,
    }


def render_gateway(
    gateway: ModelGateway, instance: str, mounts: Sequence[SecretMount]
) -> dict[str, Any]:
    """The gateway's Swarm service: no NPUs, on the deployments' network, at most one replica
    per node (host-mode ports could not be shared anyway), the client port published as
    asked and the admin port published on each replica's node (host mode), where npuswarm
    pushes the backends over TLS. Its credential and TLS key come as Swarm secrets (files on
    tmpfs), never in its environment or arguments."""
    spec = gateway.spec
    health = spec.healthCheck
    args = [
        "--port",
        str(spec.port),
        "--admin-port",
        str(spec.adminPort),
        "--router-port",
        str(ROUTER_PORT),
        "--metrics-port",
        str(ROUTER_METRICS_PORT),
        "--policy",
        spec.policy,
        "--health-interval",
        str(health.intervalSeconds),
        "--health-timeout",
        str(health.timeoutSeconds),
        "--health-failures",
        str(health.failureThreshold),
    ]
    constraints = [f"node.labels.{k}=={v}" for k, v in sorted(spec.nodeSelector.items())]
    service_labels = gateway_labels(gateway, instance)
    rendered: dict[str, Any] = {
        "Name": service_name(gateway),
        "Labels": dict(service_labels),
        "TaskTemplate": {
            "ContainerSpec": {
                "Image": spec.image,
                "Command": ["npuswarm-gateway"],
                "Args": args,
                "Secrets": [
                    {
                        "File": {
                            "Name": mount.file,
                            "UID": GATEWAY_UID,
                            "GID": GATEWAY_UID,
                            "Mode": 0o400,
                        },
                        "SecretID": mount.secret_id,
                        "SecretName": mount.name,
                    }
                    for mount in mounts
                ],
                "Labels": dict(service_labels),
                "Init": True,
                "Healthcheck": {
                    "Test": health_command(spec.port, "/health", 3),
                    "Interval": 2 * SECOND_NS,
                    "Timeout": 3 * SECOND_NS,
                    "Retries": 3,
                    "StartPeriod": 30 * SECOND_NS,
                },
            },
            "Placement": {"Constraints": constraints, "MaxReplicas": 1},
            "Networks": [{"Target": spec.network.name}],
            "RestartPolicy": {"Condition": "any", "Delay": 2 * SECOND_NS, "MaxAttempts": 0},
        },
        "Mode": {"Replicated": {"Replicas": spec.replicas}},
        # One replica at a time; stop first, since a host port and MaxReplicas 1 leave no room
        # for the new task on the old one's node.
        "UpdateConfig": {"Parallelism": 1, "Order": "stop-first", "FailureAction": "pause"},
        "EndpointSpec": {
            # The routing mesh needs a VIP; host-mode ports work with dnsrr (no IPVS needed).
            "Mode": "vip" if spec.publish.mode == "ingress" else "dnsrr",
            "Ports": [
                {
                    "Protocol": "tcp",
                    "TargetPort": spec.port,
                    "PublishedPort": spec.port,
                    "PublishMode": spec.publish.mode,
                },
                {
                    "Protocol": "tcp",
                    "TargetPort": spec.adminPort,
                    "PublishedPort": spec.adminPort,
                    "PublishMode": "host",
                },
            ],
        },
    }
    digest = hashlib.sha256(json.dumps(rendered, sort_keys=True).encode()).hexdigest()[:16]
    rendered["Labels"][labels.SPEC_HASH] = digest
    rendered["TaskTemplate"]["ContainerSpec"]["Labels"][labels.SPEC_HASH] = digest
    return rendered


def gateway_actions(
    gateways: Sequence[ModelGateway],
    snapshot: SwarmSnapshot,
    instance: str,
    mounts: Mapping[str, Sequence[SecretMount]],
    deleting: frozenset[str] = frozenset(),
) -> list[Action]:
    """Create or update each gateway's service; remove duplicates. Services of gateways not
    in ``gateways`` are left alone: their finalizer removes them (no guess from a possibly
    incomplete index)."""
    by_owner: dict[str, list[ObservedService]] = {}
    for service in snapshot.gateway_services:
        by_owner.setdefault(gateway_of(service), []).append(service)
    actions: list[Action] = []
    for gateway in gateways:
        if gateway.key in deleting:
            continue
        key = gateway_key(gateway)
        if gateway.key not in mounts:
            continue  # its secrets could not be made in this pass: the next one tries again
        spec = render_gateway(gateway, instance, mounts[gateway.key])
        found = sorted(by_owner.get(gateway.key, []), key=lambda s: s.name != spec["Name"])
        if not found:
            actions.append(
                Action("create", "gateway", spec["Name"], "new gateway", spec=spec, owner=key)
            )
            continue
        primary, extras = found[0], found[1:]
        if primary.spec_hash != spec["Labels"][labels.SPEC_HASH] or _replicas(primary) != (
            gateway.spec.replicas
        ):
            actions.append(
                Action(
                    "update",
                    "gateway",
                    primary.name,
                    "gateway spec changed"
                    if primary.spec_hash != spec["Labels"][labels.SPEC_HASH]
                    else "gateway replicas changed outside npuswarm",
                    service_id=primary.id,
                    version=primary.version,
                    spec=dict(spec, Name=primary.name),
                    owner=key,
                )
            )
        actions += [
            Action(
                "remove", "gateway", s.name, "duplicate gateway service", service_id=s.id, owner=key
            )
            for s in extras
        ]
    return actions


def gateway_of(service: ObservedService) -> str:
    """The ``namespace/name`` of the ModelGateway a gateway service belongs to."""
    namespace = service.labels.get(labels.GATEWAY_NAMESPACE, "")
    return f"{namespace}/{service.labels.get(labels.GATEWAY_NAME, '')}"


def _replicas(service: ObservedService) -> int:
    return int(((service.spec.get("Mode") or {}).get("Replicated") or {}).get("Replicas", -1))


# --- each gateway's secrets: its credential and its TLS key (gateway_credentials.py) --------

CREDENTIAL_KIND, TLS_KIND = "gateway-credential", "gateway-tls"


@dataclass(frozen=True)
class SecretMount:
    """A Swarm secret mounted as a file into a gateway's tasks."""

    name: str
    file: str
    secret_id: str = ""


@dataclass(frozen=True)
class NewSecret:
    name: str
    data: bytes = field(repr=False)
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class GatewaySecrets:
    """Secrets to create before the gateways' services are written, what each gateway mounts
    (by secret name), and its secrets nothing will mount any more (removed after the writes)."""

    create: list[NewSecret] = field(default_factory=list)
    mounts: dict[str, tuple[SecretMount, ...]] = field(default_factory=dict)
    stale: list[ObservedSecret] = field(default_factory=list)

    def resolved(self, ids: Mapping[str, str]) -> dict[str, tuple[SecretMount, ...]]:
        """Each gateway's mounts with their secret ids; a gateway one of whose secrets has no
        id (its creation failed) is left out, so its service is not written this pass."""
        found: dict[str, tuple[SecretMount, ...]] = {}
        for key, mounts in self.mounts.items():
            if all(m.name in ids for m in mounts):
                found[key] = tuple(SecretMount(m.name, m.file, ids[m.name]) for m in mounts)
        return found


def plan_secrets(
    gateways: Sequence[ModelGateway],
    observed: Sequence[ObservedSecret],
    credentials: Credentials,
    instance: str,
    now: datetime,
) -> GatewaySecrets:
    """Each gateway mounts its current credential and a TLS certificate for it that stays
    valid for longer than the renewal margin: found if it exists, else made now. Secrets are
    immutable in Swarm, so a new credential or certificate is a new secret under a new name."""
    plan = GatewaySecrets()
    by_gateway: dict[str, list[ObservedSecret]] = {}
    for secret in observed:
        by_gateway.setdefault(secret.gateway, []).append(secret)
    for gateway in gateways:
        who = identity(gateway)
        credential_id = credentials.credential_id(who)
        prefix = service_name(gateway)[:SECRET_PREFIX_LENGTH]
        base = gateway_labels(gateway, instance) | {labels.CREDENTIAL_ID: credential_id}
        mine = by_gateway.get(gateway.key, [])
        credential_name = f"{prefix}-{credential_id}-key"
        if not any(s.name == credential_name for s in mine):
            plan.create.append(
                NewSecret(
                    credential_name,
                    credentials.credential_file(who),
                    base | {labels.SECRET_KIND: CREDENTIAL_KIND},
                )
            )
        tls_name = _valid_tls(mine, credential_id, now)
        if tls_name is None:
            bundle = credentials.issue_tls(who, now)
            expires = str(int(bundle.not_after.timestamp()))
            digest = hashlib.sha256(f"{credential_id}/{expires}".encode()).hexdigest()[:16]
            tls_name = f"{prefix}-{digest}-tls"
            plan.create.append(
                NewSecret(
                    tls_name,
                    bundle.pem,
                    base | {labels.SECRET_KIND: TLS_KIND, labels.NOT_AFTER: expires},
                )
            )
        plan.mounts[gateway.key] = (
            SecretMount(credential_name, gateway_protocol.CREDENTIAL_FILE),
            SecretMount(tls_name, gateway_protocol.TLS_FILE),
        )
        wanted = {credential_name, tls_name}
        plan.stale.extend(s for s in mine if s.name not in wanted)
    return plan


def _valid_tls(secrets: Iterable[ObservedSecret], credential_id: str, now: datetime) -> str | None:
    """The name of the certificate of this credential that lasts longest, if it lasts beyond
    the renewal margin."""
    horizon = (now + TLS_RENEW_BEFORE).timestamp()
    usable = []
    for secret in secrets:
        if (
            secret.labels.get(labels.SECRET_KIND) != TLS_KIND
            or secret.labels.get(labels.CREDENTIAL_ID) != credential_id
        ):
            continue
        try:
            expires = int(secret.labels.get(labels.NOT_AFTER, ""))
        except ValueError:
            continue
        if expires > horizon:
            usable.append((expires, secret.name))
    return max(usable)[1] if usable else None


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
        if gateway_of(service) != gateway.key:
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
    # admin URL -> the error of a refused or failed push (filled by gateway_push).
    push_errors: dict[str, str] = field(default_factory=dict)


def gateway_status(
    work: GatewayWork,
    deployments: Mapping[str, str],  # served model name -> deployment key
    previous_conditions: Sequence[dict[str, Any]],
    now: datetime,
    problem: str | None = None,
) -> ModelGatewayStatus:
    """Ready: every replica runs and holds the pushed backends. A served model with no
    ready backend makes the gateway Degraded (it answers 503 for that model)."""
    gateway = work.gateway
    desired = gateway.spec.replicas
    configured = [r for r in work.replicas if r.admin_url not in work.push_errors]
    idle = sorted(model for model, urls in work.backends.items() if not urls)
    if problem is not None:
        ready = ConditionValue("False", "NotConfigured", problem)
        degraded = ConditionValue("True", "NotConfigured", problem)
    elif work.push_errors:
        message = "; ".join(f"{url}: {err}" for url, err in sorted(work.push_errors.items()))
        ready = ConditionValue("False", "PushFailed", message)
        degraded = ConditionValue("False", "AsExpected")
    elif len(configured) < desired:
        ready = ConditionValue(
            "False", "ReplicasNotReady", f"{len(configured)}/{desired} gateway replicas ready"
        )
        degraded = ConditionValue("False", "AsExpected")
    else:
        ready = ConditionValue("True", "Ready", f"{len(configured)}/{desired} replicas ready")
        degraded = ConditionValue("False", "AsExpected")
    if idle and problem is None:
        degraded = ConditionValue(
            "True", "ModelWithoutBackend", "no ready replica of " + ", ".join(idle)
        )
    progressing = (
        ConditionValue("True", "ReplicasStarting", ready.message)
        if ready.status == "False" and problem is None
        else ConditionValue("False", "AsExpected")
    )
    values: dict[ConditionType, ConditionValue] = {
        "Ready": ready,
        "Progressing": progressing,
        "Degraded": degraded,
    }
    phase: GatewayPhase = (
        "Degraded"
        if degraded.status == "True"
        else "Ready"
        if ready.status == "True"
        else "Pending"
    )
    return ModelGatewayStatus.model_construct(
        observedGeneration=gateway.metadata.generation,
        phase=phase,
        endpoint=", ".join(r.endpoint for r in work.replicas) or None,
        replicas=desired,
        readyReplicas=len(configured),
        models=[
            GatewayModelStatus.model_construct(
                model=model, deployment=deployments.get(model, ""), backends=list(urls)
            )
            for model, urls in sorted(work.backends.items())
        ],
        conditions=conditions(values, previous_conditions, gateway.metadata.generation, now),
    )


def parse_gateways(
    index: Mapping[Any, Any], written: Mapping[str, dict[str, Any]]
) -> tuple[list[ModelGateway], dict[str, dict[str, Any]]]:
    """kopf's index of ModelGateways -> the valid ones not being deleted, and each one's last
    status (what this operator wrote, else what the API server has). The CRD schema refuses
    what the model refuses, so an invalid one is only logged and skipped."""
    gateways: list[ModelGateway] = []
    previous: dict[str, dict[str, Any]] = {}
    for store in index.values():
        for raw in store:
            metadata = raw["metadata"]
            key = f"{metadata.get('namespace') or 'default'}/{metadata.get('name')}"
            previous[key] = written.get(key) or dict(raw.get("status") or {})
            if metadata.get("deletionTimestamp"):
                continue
            try:
                gateways.append(
                    ModelGateway.model_validate(
                        {"metadata": dict(metadata), "spec": dict(raw.get("spec") or {})}
                    )
                )
            except ValidationError as error:
                log.warning("invalid ModelGateway skipped", gateway=key, error=str(error))
    return sorted(gateways, key=lambda g: g.key), previous
