"""What npuswarm saw in Swarm: plain data built from Engine API JSON by pure functions."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from npuswarm import labels
from npuswarm.inventory import NodeInfo, node_from_engine, parse_engine_time
from npuswarm.npus import parse_npu_ids
from npuswarm.placement import Allocation


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
        namespace = self.labels.get(labels.OWNER_NAMESPACE, "")
        return f"{namespace}/{self.labels.get(labels.OWNER_NAME, '')}"

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
        return Allocation(
            deployment=self.deployment,
            slot=self.slot,
            node_id=node_id,
            npus=npus,
            service=self.name,
        )


def _newest_error(tasks: Iterable[ObservedTask]) -> str | None:
    failed = [t for t in tasks if t.error]
    return max(failed, key=lambda t: (t.updated, t.id)).error if failed else None


@dataclass
class SwarmSnapshot:
    nodes: list[NodeInfo]
    services: list[ObservedService]
    # Network name -> "swarm", "local" or "ingress" (policy.network_violations reads it).
    networks: dict[str, str] = field(default_factory=dict)

    def names(self) -> frozenset[str]:
        return frozenset(s.name for s in self.services)

    def services_of(self, deployment: str) -> list[ObservedService]:
        return [s for s in self.services if s.deployment == deployment]

    def allocations(self) -> list[Allocation]:
        return [a for a in (s.allocation() for s in self.services) if a is not None]

    def node(self, node_id: str) -> NodeInfo | None:
        return next((n for n in self.nodes if n.id == node_id), None)


def snapshot_from_engine(
    nodes: list[dict[str, Any]],
    services: list[dict[str, Any]],
    tasks: list[dict[str, Any]],
    networks: list[dict[str, Any]],
) -> SwarmSnapshot:
    """Assemble one consistent view out of the four list calls of an observe pass."""
    network_names = {n["Id"]: n["Name"] for n in networks if "Id" in n and "Name" in n}
    owned = [
        s
        for s in services
        if (s.get("Spec", {}).get("Labels") or {}).get(labels.MANAGED_BY) == labels.MANAGED_BY_VALUE
    ]
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
    for raw_task in tasks:
        service = by_id.get(raw_task.get("ServiceID", ""))
        if service is not None:
            service.tasks.append(_task_from_engine(raw_task))
    return SwarmSnapshot(
        nodes=sorted((node_from_engine(n) for n in nodes), key=lambda n: (n.hostname, n.id)),
        services=sorted(by_id.values(), key=lambda s: s.name),
        networks={
            n["Name"]: "ingress" if n.get("Ingress") else str(n.get("Scope") or "local")
            for n in networks
            if "Name" in n
        },
    )


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


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
        created=parse_engine_time(raw.get("CreatedAt")) or _EPOCH,
        updated=parse_engine_time(status.get("Timestamp") or raw.get("UpdatedAt")) or _EPOCH,
        spec_hash=container_labels.get(labels.SPEC_HASH),
    )


def _with_network_names(spec: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """Swarm stores network ids where npuswarm rendered names; map them back for comparison."""
    template = spec.get("TaskTemplate") or {}
    attached = template.get("Networks")
    if not attached:
        return spec
    renamed = [dict(n, Target=names.get(n.get("Target", ""), n.get("Target"))) for n in attached]
    return dict(spec, TaskTemplate=dict(template, Networks=renamed))
