"""What npuswarm saw in Swarm: plain data built from Engine API JSON by pure functions."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from npuswarm.api import labels
from npuswarm.api.meta import object_key
from npuswarm.core.clock import EPOCH, parse_engine_time
from npuswarm.core.nodes import NodeInfo, node_from_engine
from npuswarm.core.npus import npu_id_from_device, parse_npu_ids
from npuswarm.core.placement import Allocation


@dataclass(frozen=True)
class ObservedTask:
    id: str
    service_id: str
    node_id: str | None
    state: str
    desired_state: str
    error: str | None
    created: datetime
    updated: datetime
    spec_hash: str | None  # the service spec this task was started from
    # (network name, IP) of each overlay attachment: where a gateway reaches the replica.
    addresses: tuple[tuple[str, str], ...] = ()

    def address_on(self, network: str) -> str | None:
        return next((ip for name, ip in self.addresses if name == network), None)


@dataclass
class ObservedService:
    id: str
    name: str
    version: int
    labels: dict[str, str]
    spec: dict[str, Any]
    tasks: list[ObservedTask] = field(default_factory=list)

    @property
    def deployment(self) -> str:
        return object_key(
            self.labels.get(labels.OWNER_NAMESPACE, ""), self.labels.get(labels.OWNER_NAME, "")
        )

    @property
    def gateway(self) -> str:
        """The ``namespace/name`` of the ModelGateway a gateway service belongs to."""
        return _gateway_of(self.labels)

    @property
    def slot(self) -> str:
        return self.labels.get(labels.REPLICA, "")

    @property
    def spec_hash(self) -> str | None:
        return self.labels.get(labels.SPEC_HASH)

    @property
    def newest_task(self) -> ObservedTask | None:
        return max(self.tasks, key=lambda t: (t.created, t.id), default=None)

    @property
    def last_error(self) -> str | None:
        """The newest task error of any spec, for the record."""
        return _newest_error(self.tasks)

    @property
    def current_error(self) -> str | None:
        """The newest error of a task started from the current spec; older specs' failures
        are history, not a reason to call the replica failing now."""
        return _newest_error(t for t in self.tasks if t.spec_hash == self.spec_hash)

    @property
    def running_current_spec(self) -> bool:
        task = self.newest_task
        return (
            task is not None
            and task.state == "running"
            and task.desired_state == "running"
            and (task.spec_hash is None or task.spec_hash == self.spec_hash)
        )

    def allocation(self) -> Allocation | None:
        """The NPU claim in this service's labels; None if the labels are not a valid claim."""
        node_id = self.labels.get(labels.NODE)
        npu_text = self.labels.get(labels.NPUS)
        if not node_id or npu_text is None or not self.slot:
            return None
        try:
            npus = parse_npu_ids(npu_text)
        except ValueError:
            return None
        block = self.labels.get(labels.PORT_BLOCK, "")
        return Allocation(
            deployment=self.deployment,
            slot=self.slot,
            node_id=node_id,
            npus=npus,
            service=self.name,
            port_block=int(block) if block.isdigit() else None,
        )


def _newest_error(tasks: Iterable[ObservedTask]) -> str | None:
    failed = [t for t in tasks if t.error]
    return max(failed, key=lambda t: (t.updated, t.id)).error if failed else None


@dataclass(frozen=True)
class ForeignClaim:
    """NPUs that a service npuswarm does not own holds (or will hold) on one node."""

    service: str
    node_id: str
    npus: frozenset[int]

    def allocation(self) -> Allocation:
        return Allocation(
            deployment="",
            slot="",
            node_id=self.node_id,
            npus=self.npus,
            service=self.service,
            foreign=True,
        )


@dataclass(frozen=True)
class StoppingClaim:
    """NPUs a task of a removed service, or one an update replaced, still holds while it
    stops (within its stop grace period): Swarm lists such a task, desired state "remove" or
    "shutdown", until its container exits."""

    owner: str  # "namespace/name[slot]" of npuswarm's, else the service id
    node_id: str
    npus: frozenset[int]
    # A removed multi-node member's group port block: its host ports stay taken on its node
    # until it exits, so no new group gets that block there.
    port_block: int | None = None

    def allocation(self) -> Allocation:
        return Allocation(
            deployment="",
            slot="",
            node_id=self.node_id,
            npus=self.npus,
            service=f"{self.owner} (stopping)",
            stopping=True,
            port_block=self.port_block,
        )


@dataclass
class SwarmSnapshot:
    nodes: list[NodeInfo]
    services: list[ObservedService]
    foreign: list[ForeignClaim] = field(default_factory=list)
    # NPUs (and a group member's port block) of tasks that still stop, their service gone or
    # updated (a replica moved keeps its old NPUs until its old task exits): a preemptor is
    # placed only once its victims have exited (core/preemption.py), a group never gets a
    # block a stopping member still holds (core/gang.py).
    stopping: list[StoppingClaim] = field(default_factory=list)
    # Network name -> "swarm", "local" or "ingress", npuswarm's or not
    # (policy.network_violations reads it).
    networks: dict[str, str] = field(default_factory=dict)
    # Ids of every network: Docker reads a service's network as an id before a name.
    network_ids: frozenset[str] = frozenset()
    # Names of every service in the Swarm, npuswarm's or not: a name a create must avoid.
    service_names: frozenset[str] = frozenset()
    # Networks this installation created: name -> id.
    own_networks: dict[str, str] = field(default_factory=dict)
    # ModelGateways' services (npuswarm's, but not replicas of a deployment; gateway/service.py).
    gateway_services: list[ObservedService] = field(default_factory=list)
    # The namespace each of npuswarm's networks was created for (label NETWORK_NAMESPACE).
    network_namespace: dict[str, str] = field(default_factory=dict)
    # The namespaces whose replicas or gateways are on each network now (for networks made
    # before they carried a namespace: those namespaces keep them).
    network_users: dict[str, frozenset[str]] = field(default_factory=dict)
    _by_deployment: dict[str, list[ObservedService]] = field(default_factory=dict, repr=False)
    _nodes_by_id: dict[str, NodeInfo] = field(default_factory=dict, repr=False)
    _allocations: tuple[Allocation, ...] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # Indexed once: every deployment of a pass looks its services and nodes up here.
        for service in self.services:
            self._by_deployment.setdefault(service.deployment, []).append(service)
        self._nodes_by_id.update({node.id: node for node in self.nodes})

    def names(self) -> frozenset[str]:
        return self.service_names | {s.name for s in self.services}

    def services_of(self, deployment: str) -> list[ObservedService]:
        return self._by_deployment.get(deployment, [])

    def deployments(self) -> set[str]:
        """Every owner (``namespace/name``) that has services in Swarm."""
        return set(self._by_deployment)

    def allocations(self) -> tuple[Allocation, ...]:
        """npuswarm's claims from its labels, then stopping tasks', then every foreign claim.
        Worked out once: the pass, its report and the node checks each ask, and at 2,000
        services parsing the claims was a measurable part of a steady fleet's CPU."""
        if self._allocations is None:
            own = [a for a in (s.allocation() for s in self.services) if a is not None]
            stopping = [claim.allocation() for claim in self.stopping]
            foreign = [claim.allocation() for claim in self.foreign]
            self._allocations = (*own, *stopping, *foreign)
        return self._allocations

    def node(self, node_id: str) -> NodeInfo | None:
        return self._nodes_by_id.get(node_id)


def snapshot_from_engine(
    nodes: list[dict[str, Any]],
    services: list[dict[str, Any]],
    tasks: list[dict[str, Any]],
    networks: list[dict[str, Any]],
    instance: str = labels.DEFAULT_INSTANCE,
) -> SwarmSnapshot:
    """Assemble one consistent view out of the four list calls of an observe pass.

    ``services`` are all of Swarm's: those of this npuswarm ``instance`` are its own; every
    other one (hand-made, a stack, another npuswarm) is only read for the NPUs it holds.
    """
    network_names = {n["Id"]: n["Name"] for n in networks if "Id" in n and "Name" in n}
    owned: list[dict[str, Any]] = []
    others: list[dict[str, Any]] = []
    for raw in services:
        service_labels = (raw.get("Spec") or {}).get("Labels") or {}
        if labels.NPU_SMI_READING in service_labels or labels.NODE_AGENT in service_labels:
            # Reads npu-smi only: it shares NPUs and claims none (nodehealth/agents.py; the
            # npu-smi reading services of earlier versions, nodehealth/npusmi.py).
            continue
        (owned if is_own(service_labels, instance) else others).append(raw)
    by_id: dict[str, ObservedService] = {}
    for raw in owned:
        spec = _with_network_names(raw.get("Spec") or {}, network_names)
        by_id[raw["ID"]] = ObservedService(
            id=raw["ID"],
            name=spec.get("Name", ""),
            version=int((raw.get("Version") or {}).get("Index", 0)),
            labels=dict(spec.get("Labels") or {}),
            spec=spec,
        )
    foreign_tasks: dict[str, list[dict[str, Any]]] = {}
    # Tasks an update of one of our services replaced, still in their stop grace: they hold
    # the NPUs of the spec before the update (a replica moved to other NPUs or nodes).
    superseded: dict[str, list[dict[str, Any]]] = {}
    for raw_task in tasks:
        service_id = raw_task.get("ServiceID", "")
        service = by_id.get(service_id)
        if service is not None:
            service.tasks.append(_task_from_engine(raw_task))
            if raw_task.get("DesiredState") in SUPERSEDED_DESIRED_STATES:
                superseded.setdefault(service_id, []).append(raw_task)
        else:
            foreign_tasks.setdefault(service_id, []).append(raw_task)
    gateways = [by_id.pop(i) for i in list(by_id) if labels.GATEWAY_NAME in by_id[i].labels]
    node_infos = sorted((node_from_engine(n) for n in nodes), key=lambda n: (n.hostname, n.id))
    hostnames = {node.hostname: node.id for node in node_infos}
    foreign = [
        claim
        for raw in others
        for claim in foreign_claims(raw, foreign_tasks.get(raw.get("ID", ""), []), hostnames)
    ]
    listed = {raw.get("ID", "") for raw in services}
    stopping = [
        claim
        for service_id, orphaned in foreign_tasks.items()
        if service_id not in listed
        for claim in stopping_claims(service_id, orphaned)
    ] + [
        claim
        for service_id, replaced in superseded.items()
        for claim in stopping_claims(service_id, replaced)
    ]
    users: dict[str, set[str]] = {}
    for service in [*by_id.values(), *gateways]:
        namespace = service.labels.get(labels.OWNER_NAMESPACE) or service.labels.get(
            labels.GATEWAY_NAMESPACE
        )
        for attached in (service.spec.get("TaskTemplate") or {}).get("Networks") or []:
            if namespace:
                users.setdefault(str(attached.get("Target")), set()).add(namespace)
    return SwarmSnapshot(
        network_namespace={
            n["Name"]: (n.get("Labels") or {})[labels.NETWORK_NAMESPACE]
            for n in networks
            if is_own(n.get("Labels") or {}, instance)
            and labels.NETWORK_NAMESPACE in (n.get("Labels") or {})
        },
        network_users={name: frozenset(found) for name, found in users.items()},
        nodes=node_infos,
        services=sorted(by_id.values(), key=lambda s: s.name),
        foreign=sorted(foreign, key=lambda c: (c.node_id, c.service)),
        stopping=sorted(stopping, key=lambda c: (c.node_id, c.owner)),
        networks={
            n["Name"]: "ingress" if n.get("Ingress") else str(n.get("Scope") or "local")
            for n in networks
            if "Name" in n
        },
        network_ids=frozenset(str(n["Id"]) for n in networks if "Id" in n),
        service_names=frozenset(str((raw.get("Spec") or {}).get("Name", "")) for raw in services),
        own_networks={
            n["Name"]: n["Id"]
            for n in networks
            if is_own(n.get("Labels") or {}, instance) and "Id" in n and "Name" in n
        },
        gateway_services=sorted(gateways, key=lambda s: s.name),
    )


@dataclass(frozen=True)
class ObservedSecret:
    """One of this installation's Swarm secrets (a ModelGateway's credential or TLS key)."""

    id: str
    name: str
    labels: dict[str, str]

    @property
    def gateway(self) -> str:
        """The ``namespace/name`` of the ModelGateway it belongs to."""
        return _gateway_of(self.labels)


def _gateway_of(object_labels: dict[str, str]) -> str:
    return object_key(
        object_labels.get(labels.GATEWAY_NAMESPACE, ""), object_labels.get(labels.GATEWAY_NAME, "")
    )


def secrets_from_engine(raw: list[dict[str, Any]], instance: str) -> list[ObservedSecret]:
    """This installation's secrets among those listed (never their data: Swarm has no call
    that returns it)."""
    found = []
    for secret in raw:
        spec = secret.get("Spec") or {}
        secret_labels = dict(spec.get("Labels") or {})
        if is_own(secret_labels, instance) and secret.get("ID"):
            name = str(spec.get("Name", ""))
            found.append(ObservedSecret(str(secret["ID"]), name, secret_labels))
    return sorted(found, key=lambda s: s.name)


def is_own(object_labels: dict[str, str], instance: str) -> bool:
    """Made by this npuswarm installation (a service or a network)."""
    return object_labels.get(labels.MANAGED_BY) == labels.MANAGED_BY_VALUE and (
        object_labels.get(labels.INSTANCE, labels.DEFAULT_INSTANCE) == instance
    )


LIVE_TASK_STATES = frozenset(
    {"new", "pending", "assigned", "accepted", "preparing", "ready", "starting", "running"}
)
# What Swarm wants of a task an update replaced or a removal ends: it is told to stop, and it
# runs on until its container exits (within the service's stop grace period).
SUPERSEDED_DESIRED_STATES = frozenset({"shutdown", "remove"})


def foreign_claims(
    service: dict[str, Any], tasks: list[dict[str, Any]], hostnames: dict[str, str]
) -> list[ForeignClaim]:
    """The NPUs a service that npuswarm does not own holds, node by node.

    Three signs, any of which counts: another npuswarm's allocation labels; the NPU generic
    resources Swarm assigned to its live tasks; ASCEND_VISIBLE_DEVICES in its env, on the
    nodes its live tasks run on and on the node its constraints pin it to (a pending task
    takes those NPUs as soon as it starts). Over-counting only keeps NPUs idle; missing a
    claim would give one NPU to two workloads.
    """
    spec = service.get("Spec") or {}
    name = spec.get("Name") or service.get("ID", "")
    service_labels = spec.get("Labels") or {}
    claims: dict[str, set[int]] = {}
    if service_labels.get(labels.MANAGED_BY) == labels.MANAGED_BY_VALUE:
        node_id = service_labels.get(labels.NODE)
        try:
            npus = parse_npu_ids(service_labels.get(labels.NPUS, ""))
        except ValueError:
            npus = frozenset()
        if node_id and npus:
            claims.setdefault(node_id, set()).update(npus)
    template = spec.get("TaskTemplate") or {}
    env_npus = _env_npus((template.get("ContainerSpec") or {}).get("Env") or [])
    live = [
        t
        for t in tasks
        if t.get("DesiredState") == "running"
        and ((t.get("Status") or {}).get("State") in LIVE_TASK_STATES)
        and t.get("NodeID")
    ]
    for task in live:
        node_id = task["NodeID"]
        for resource in task.get("AssignedGenericResources") or []:
            named = resource.get("NamedResourceSpec") or {}
            npu = (
                npu_id_from_device(str(named.get("Value", "")))
                if named.get("Kind") == "NPU"
                else None
            )
            if npu is not None:
                claims.setdefault(node_id, set()).add(npu)
        if env_npus:
            claims.setdefault(node_id, set()).update(env_npus)
    if env_npus:
        for node_id in _constrained_nodes(template, hostnames):
            claims.setdefault(node_id, set()).update(env_npus)
    return [
        ForeignClaim(service=name, node_id=node_id, npus=frozenset(npus))
        for node_id, npus in sorted(claims.items())
        if npus
    ]


def stopping_claims(service_id: str, tasks: list[dict[str, Any]]) -> list[StoppingClaim]:
    """The NPUs the still-live tasks of a removed service (or the tasks an update of one of
    ours replaced) hold: from npuswarm's labels on the
    container, else its ASCEND_VISIBLE_DEVICES, else the NPU generic resources Swarm gave it;
    and a multi-node member's port block (any installation's: its host ports are taken)."""
    claims = []
    for task in tasks:
        node_id = task.get("NodeID")
        if not node_id or (task.get("Status") or {}).get("State") not in LIVE_TASK_STATES:
            continue
        container = (task.get("Spec") or {}).get("ContainerSpec") or {}
        task_labels = container.get("Labels") or {}
        npus: frozenset[int] = frozenset()
        owner = service_id
        if labels.NPUS in task_labels:
            try:
                npus = parse_npu_ids(task_labels[labels.NPUS])
            except ValueError:
                npus = frozenset()
            owner = (
                object_key(
                    task_labels.get(labels.OWNER_NAMESPACE, ""),
                    task_labels.get(labels.OWNER_NAME, ""),
                )
                + f"[{task_labels.get(labels.REPLICA, '')}]"
            )
        if not npus:
            npus = _env_npus(container.get("Env") or [])
        if not npus:
            npus = frozenset(
                npu
                for resource in task.get("AssignedGenericResources") or []
                if (resource.get("NamedResourceSpec") or {}).get("Kind") == "NPU"
                and (
                    npu := npu_id_from_device(
                        str((resource.get("NamedResourceSpec") or {}).get("Value", ""))
                    )
                )
                is not None
            )
        block = str(task_labels.get(labels.PORT_BLOCK, ""))
        port_block = int(block) if block.isdigit() else None
        if npus or port_block is not None:
            claims.append(StoppingClaim(owner, node_id, npus, port_block))
    return claims


def _env_npus(env: list[str]) -> frozenset[int]:
    for pair in env:
        key, _, value = pair.partition("=")
        if key == "ASCEND_VISIBLE_DEVICES":
            try:
                return parse_npu_ids(value)
            except ValueError:
                return frozenset()
    return frozenset()


def _constrained_nodes(template: dict[str, Any], hostnames: dict[str, str]) -> list[str]:
    constraints = (template.get("Placement") or {}).get("Constraints") or []
    nodes = []
    for constraint in constraints:
        field_name, op, value = (part.strip() for part in _split_constraint(constraint))
        if op != "==":
            continue
        if field_name == "node.id":
            nodes.append(value)
        elif field_name == "node.hostname" and value in hostnames:
            nodes.append(hostnames[value])
    return nodes


def _split_constraint(constraint: str) -> tuple[str, str, str]:
    for op in ("==", "!="):
        left, found, right = constraint.partition(op)
        if found:
            return left, op, right
    return constraint, "", ""


def _task_from_engine(raw: dict[str, Any]) -> ObservedTask:
    status = raw.get("Status") or {}
    container_labels = ((raw.get("Spec") or {}).get("ContainerSpec") or {}).get("Labels") or {}
    return ObservedTask(
        id=raw.get("ID", ""),
        service_id=raw.get("ServiceID", ""),
        node_id=raw.get("NodeID"),
        state=status.get("State", "unknown"),
        desired_state=raw.get("DesiredState", "unknown"),
        error=status.get("Err") or None,
        created=parse_engine_time(raw.get("CreatedAt")) or EPOCH,
        updated=parse_engine_time(status.get("Timestamp") or raw.get("UpdatedAt")) or EPOCH,
        spec_hash=container_labels.get(labels.SPEC_HASH),
        addresses=tuple(
            (str(((a.get("Network") or {}).get("Spec") or {}).get("Name", "")), ip.split("/")[0])
            for a in raw.get("NetworksAttachments") or []
            for ip in a.get("Addresses") or []
        ),
    )


def _with_network_names(spec: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """Swarm stores network ids where npuswarm rendered names; map them back for comparison."""
    template = spec.get("TaskTemplate") or {}
    attached = template.get("Networks")
    if not attached:
        return spec
    # A multi-node replica's member is rendered on "host" only; Swarm stores the cluster-wide
    # id of its host network, which GET /networks does not list (it lists the local one).
    member = labels.PORT_BLOCK in (spec.get("Labels") or {})
    renamed = [
        dict(n, Target=names.get(n.get("Target", ""), "host" if member else n.get("Target")))
        for n in attached
    ]
    return dict(spec, TaskTemplate=dict(template, Networks=renamed))
