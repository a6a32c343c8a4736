"""A ModelGateway's own Swarm service and its secrets. Pure: reconcile.py writes the service
and the secrets, gateway/push.py the backends (gateway/backends.py).

The service runs the gateway image (vllm-router and gateway/front.py) without NPUs, on the
deployments' network; its credential and TLS key come as Swarm secrets, made here from the
operator's root key (gateway/credentials.py) and immutable, so a new one is a new secret.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from npuswarm.api import labels
from npuswarm.api.gateway import ModelGateway, ModelGatewaySpec
from npuswarm.core.clock import SECOND_NS
from npuswarm.core.diff import Action
from npuswarm.core.render import health_command, network_labels, swarm_name
from npuswarm.core.snapshot import ObservedSecret, ObservedService, SwarmSnapshot
from npuswarm.gateway import protocol
from npuswarm.gateway.credentials import (
    ROTATE_ANNOTATION,
    TLS_RENEW_BEFORE,
    Credentials,
    GatewayIdentity,
    Identity,
)

ROUTER_PORT = 30000
ROUTER_METRICS_PORT = 29000
# The gateway image's user (Dockerfile.gateway): it alone may read the mounted secrets.
GATEWAY_UID = "10001"
SECRET_PREFIX_LENGTH = 40  # of the service name, in a secret's name (Swarm allows 64)


def gateway_key(key: str) -> str:
    """Where a gateway's ``namespace/name`` shares a map with deployments' keys (its services'
    writes, the generations the handlers saw)."""
    return f"gateway:{key}"


def identity(gateway: ModelGateway) -> GatewayIdentity:
    meta = gateway.metadata
    return GatewayIdentity(
        meta.namespace, meta.name, meta.uid, meta.annotations.get(ROTATE_ANNOTATION, "")
    )


def service_name(gateway: ModelGateway) -> str:
    return swarm_name(gateway.metadata.namespace, gateway.metadata.name, "gateway")


# --- the gateway's own Swarm service --------------------------------------------------------


def gateway_labels(gateway: ModelGateway, instance: str) -> dict[str, str]:
    """npuswarm's marks (managed-by, instance) and the gateway's name, but no owner labels:
    a gateway's service is no replica of any deployment."""
    return network_labels(instance) | {
        labels.GATEWAY_NAMESPACE: gateway.metadata.namespace,
        labels.GATEWAY_NAME: gateway.metadata.name,
    }


def front_args(spec: ModelGatewaySpec) -> list[str]:
    """The front's command line (gateway/front.py): its ports, routing and request bounds."""
    health = spec.healthCheck
    return [
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
        "--max-body-bytes",
        str(spec.requestLimits.maxBodyBytes),
        "--body-timeout",
        str(spec.requestLimits.bodyTimeoutSeconds),
        "--max-in-flight",
        str(spec.requestLimits.maxInFlight),
    ]


def secret_file(mount: SecretMount) -> dict[str, Any]:
    """A Swarm secret as a file only the front's user can read (on tmpfs, never in env)."""
    return {
        "File": {"Name": mount.file, "UID": GATEWAY_UID, "GID": GATEWAY_UID, "Mode": 0o400},
        "SecretID": mount.secret_id,
        "SecretName": mount.name,
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
    constraints = [f"node.labels.{k}=={v}" for k, v in sorted(spec.nodeSelector.items())]
    service_labels = gateway_labels(gateway, instance)
    rendered: dict[str, Any] = {
        "Name": service_name(gateway),
        "Labels": dict(service_labels),
        "TaskTemplate": {
            "ContainerSpec": {
                "Image": spec.image,
                "Command": ["npuswarm-gateway"],
                "Args": front_args(spec),
                "Secrets": [secret_file(mount) for mount in mounts],
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
            # Past its memory, the kernel stops the replica rather than the node.
            "Resources": {"Limits": {"MemoryBytes": spec.requestLimits.memoryBytes}},
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
        by_owner.setdefault(service.gateway, []).append(service)
    actions: list[Action] = []
    for gateway in gateways:
        if gateway.key in deleting:
            continue
        key = gateway_key(gateway.key)
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


def _replicas(service: ObservedService) -> int:
    return int(((service.spec.get("Mode") or {}).get("Replicated") or {}).get("Replicas", -1))


# --- each gateway's secrets: its credential and its TLS key (gateway/credentials.py) -------

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
        tls_name = valid_tls(mine, credential_id, now)
        if tls_name is None:
            fresh = new_tls_secret(credentials, who, credential_id, prefix, base, now)
            tls_name = fresh.name
            plan.create.append(fresh)
        plan.mounts[gateway.key] = (
            SecretMount(credential_name, protocol.CREDENTIAL_FILE),
            SecretMount(tls_name, protocol.TLS_FILE),
        )
        wanted = {credential_name, tls_name}
        plan.stale.extend(s for s in mine if s.name not in wanted)
    return plan


def new_tls_secret(
    credentials: Credentials,
    who: Identity,
    credential_id: str,
    prefix: str,
    base: dict[str, str],
    now: datetime,
    kind: str = TLS_KIND,
) -> NewSecret:
    """A fresh certificate for ``who`` as a new secret (Swarm secrets are immutable), named
    after its credential and expiry; ``valid_tls`` finds it again by those labels."""
    bundle = credentials.issue_tls(who, now)
    expires = str(int(bundle.not_after.timestamp()))
    digest = hashlib.sha256(f"{credential_id}/{expires}".encode()).hexdigest()[:16]
    return NewSecret(
        f"{prefix}-{digest}-tls",
        bundle.pem,
        base | {labels.SECRET_KIND: kind, labels.NOT_AFTER: expires},
    )


def valid_tls(
    secrets: Iterable[ObservedSecret], credential_id: str, now: datetime, kind: str = TLS_KIND
) -> str | None:
    """The name of the certificate (secret kind ``kind``) of this credential that lasts
    longest, if it lasts beyond the renewal margin."""
    horizon = (now + TLS_RENEW_BEFORE).timestamp()
    usable = []
    for secret in secrets:
        if (
            secret.labels.get(labels.SECRET_KIND) != kind
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
