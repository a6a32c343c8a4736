"""Render: a ModelDeployment plus one replica's placement -> a Swarm ServiceSpec. Pure.

The output is Engine API JSON (``POST /services/create``), so what is tested here is exactly
what is sent. One service per replica, because every replica needs its own
ASCEND_VISIBLE_DEVICES and Swarm gives all tasks of a service the same env.

Step 3 of the pass (core/pipeline.py): render_slots gives each placed replica of a deployment
the spec it wants and the service that spec is compared with in step 4, the diff.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from npuswarm.api import labels
from npuswarm.api.deployment import ModelDeployment
from npuswarm.core.clock import SECOND_NS
from npuswarm.core.npus import format_npu_ids
from npuswarm.core.placement import Assignment, GroupSeat
from npuswarm.core.snapshot import ObservedService, SwarmSnapshot

MAX_SERVICE_NAME = 63


def swarm_name(*parts: str) -> str:
    """A Swarm service or secret name made of Kubernetes names: ``parts`` joined by ``-``.

    Swarm allows letters, digits, ``-`` and ``_`` ("valid as a DNS name component"), at most
    63 characters; a Kubernetes name may also hold dots (``qwen2.5-7b``) but never ``_``. So a
    dot becomes ``_``: two different Kubernetes names stay apart (``qwen2.5-7b`` and
    ``qwen2-5-7b`` are both valid), and a name without dots, as every name Swarm accepted
    before was, stays what it was (no running replica is renamed at an upgrade). Past 63
    characters the name is shortened with a hash of the whole."""
    return _fit("-".join(parts).replace(".", "_"))


def service_name(md: ModelDeployment, slot: str) -> str:
    """``<namespace>-<name>-<slot>`` as Swarm accepts it (swarm_name)."""
    return swarm_name(md.metadata.namespace, md.metadata.name, slot)


def free_service_name(md: ModelDeployment, slot: str, taken: Collection[str]) -> str:
    """The name for a new service: ``service_name``, unless a service of another deployment
    already has it (namespace ``c`` name ``a-b`` and namespace ``c-a`` name ``b`` both give
    ``c-a-b-0``); then the owner's namespace/name hash makes it unique, so a neighbour's
    choice of names can never block a create. Services are found by label, never by name."""
    name = service_name(md, slot)
    if name not in taken:
        return name
    owner = hashlib.sha256(md.key.encode()).hexdigest()[:8]
    return swarm_name(md.metadata.namespace, md.metadata.name, owner, slot)


def _fit(name: str) -> str:
    if len(name) <= MAX_SERVICE_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: MAX_SERVICE_NAME - 9]}-{digest}"


def network_alias(md: ModelDeployment) -> str | None:
    if md.spec.network is None:
        return None
    return md.spec.network.alias or md.metadata.name


def vllm_args(md: ModelDeployment, seat: GroupSeat | None = None) -> list[str]:
    """The `vllm serve` argument list; a list, so no shell ever re-splits user values."""
    spec = md.spec
    engine = spec.engine
    port = seat.ports.api if seat is not None else engine.port
    args = [
        "serve",
        spec.model,
        "--served-model-name",
        spec.served_model_name,
        "--tensor-parallel-size",
        str(engine.tensorParallelSize),
        "--host",
        "0.0.0.0",
        "--port",
        str(port),
    ]
    if seat is not None:
        args += group_args(md, seat)
    elif engine.dataParallelSize is not None:
        args += ["--data-parallel-size", str(engine.dataParallelSize)]
    if engine.enableExpertParallel:
        args.append("--enable-expert-parallel")
    if engine.maxModelLen is not None:
        args += ["--max-model-len", str(engine.maxModelLen)]
    return args + list(engine.extraArgs)


def group_args(md: ModelDeployment, seat: GroupSeat) -> list[str]:
    """vllm-ascend's multi-node data parallel flags (docs/multi-node.md): every member names
    the whole group and the leader; the others run --headless from their first rank."""
    local = md.spec.data_parallel_size // seat.members
    args = [
        "--data-parallel-size",
        str(md.spec.data_parallel_size),
        "--data-parallel-size-local",
        str(local),
        "--data-parallel-address",
        seat.leader_address,
        "--data-parallel-rpc-port",
        str(seat.ports.rpc),
    ]
    if seat.member > 0:
        args += ["--headless", "--data-parallel-start-rank", str(local * seat.member)]
    return args


def group_env(seat: GroupSeat, default_interface: str) -> dict[str, str]:
    """HCCL, Gloo and TP sockets on the node's own address and interface; without a known
    interface they are left to pick one themselves (HCCL_IF_IP still names the address)."""
    env = {"HCCL_IF_IP": seat.address, "HCCL_IF_BASE_PORT": str(seat.ports.hccl_base)}
    interface = seat.interface or default_interface
    if interface:
        env |= dict.fromkeys(
            ("GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME", "HCCL_SOCKET_IFNAME"), interface
        )
    return env


def container_env(
    md: ModelDeployment, npus: frozenset[int], group: Mapping[str, str] | None = None
) -> list[str]:
    env = dict(md.spec.engine.env) | dict(group or {})
    # The runtime hook mounts exactly these host NPUs; inside, they are renumbered 0..N-1.
    env["ASCEND_VISIBLE_DEVICES"] = format_npu_ids(npus)
    env["ASCEND_RT_VISIBLE_DEVICES"] = format_npu_ids(range(len(npus)))
    return [f"{key}={value}" for key, value in sorted(env.items())]


def health_command(port: int, path: str, timeout_seconds: int) -> list[str]:
    # python3 is in every vLLM image; curl is not guaranteed. urlopen raises on non-2xx.
    probe = (
        "import urllib.request; "
        f"urllib.request.urlopen('http://127.0.0.1:{port}{path}', timeout={timeout_seconds})"
    )
    return ["CMD", "python3", "-c", probe]


def owner_labels(md: ModelDeployment, instance: str = labels.DEFAULT_INSTANCE) -> dict[str, str]:
    owner = {
        labels.MANAGED_BY: labels.MANAGED_BY_VALUE,
        labels.OWNER_NAMESPACE: md.metadata.namespace,
        labels.OWNER_NAME: md.metadata.name,
        labels.OWNER_UID: md.metadata.uid,
    }
    # The default installation writes no instance label, so services made before instances
    # existed are still its own and are not rewritten on upgrade.
    if instance != labels.DEFAULT_INSTANCE:
        owner[labels.INSTANCE] = instance
    return owner


def network_labels(instance: str = labels.DEFAULT_INSTANCE) -> dict[str, str]:
    """Marks a network npuswarm created, so it removes only its own."""
    marks = {labels.MANAGED_BY: labels.MANAGED_BY_VALUE}
    if instance != labels.DEFAULT_INSTANCE:
        marks[labels.INSTANCE] = instance
    return marks


# How long Swarm lets a stopping replica finish its requests before SIGKILL (Swarm's own
# default is 10 s, which cuts most generations short). A replica leaves every gateway before it
# is stopped (docs/gateway.md), so only requests already under way need it.
DEFAULT_STOP_GRACE_SECONDS = 120.0


def render_service(
    md: ModelDeployment,
    assignment: Assignment,
    name: str | None = None,
    instance: str = labels.DEFAULT_INSTANCE,
    stop_grace_seconds: float = DEFAULT_STOP_GRACE_SECONDS,
    hccl_interface: str = "",
) -> dict[str, Any]:
    """``name`` keeps an existing service's name: Swarm cannot rename a service.
    ``hccl_interface``: a group member's interface when its node has no label for it."""
    replica_labels = owner_labels(md, instance) | {
        labels.REPLICA: assignment.slot,
        labels.NODE: assignment.node_id,
        labels.NPUS: format_npu_ids(assignment.npus),
        labels.MODEL: md.spec.served_model_name,
    }
    seat = assignment.group
    if seat is not None:
        replica_labels[labels.PORT_BLOCK] = str(seat.ports.block)
        if seat.generation:
            replica_labels[labels.GROUP_GENERATION] = str(seat.generation)
    container = _container(md, assignment.npus, replica_labels, seat, hccl_interface)
    task_template = _task_template(md, assignment.node_id, container)
    if seat is not None:
        # The rendezvous, torch.distributed and HCCL bind host addresses (docs/multi-node.md).
        task_template["Networks"] = [{"Target": "host"}]
        # Swarm would restart a failed member alone, into a group that no longer expects it
        # (vLLM's leader takes no late member; the others hang or exit): npuswarm restarts
        # the whole group instead, with back-off (core/groups.py).
        task_template["RestartPolicy"] = dict(task_template["RestartPolicy"], Condition="none")
    rendered: dict[str, Any] = {
        "Name": name or service_name(md, assignment.slot),
        "Labels": dict(replica_labels),
        "TaskTemplate": task_template,
        "Mode": {"Replicated": {"Replicas": 1}},
        # Stop first: the replacement task needs the NPUs the old one holds.
        "UpdateConfig": {"Parallelism": 1, "Order": "stop-first", "FailureAction": "pause"},
        "EndpointSpec": _endpoint_spec(md),
    }
    digest = spec_hash(rendered)
    # On the container too, so each task tells which spec it was started from.
    rendered["Labels"][labels.SPEC_HASH] = digest
    container["Labels"][labels.SPEC_HASH] = digest
    # Outside essential() and the hash on purpose: a new grace period alone rewrites no
    # service (that would restart every loaded model at an upgrade); it rides on each
    # replica's next update for another reason (docs/autoscaling.md).
    container["StopGracePeriod"] = int(stop_grace_seconds * SECOND_NS)
    return rendered


def _container(
    md: ModelDeployment,
    npus: frozenset[int],
    replica_labels: dict[str, str],
    seat: GroupSeat | None = None,
    hccl_interface: str = "",
) -> dict[str, Any]:
    spec = md.spec
    mounts: list[dict[str, Any]] = [
        {
            "Type": "bind",
            "Source": volume.hostPath,
            "Target": volume.mountPath,
            "ReadOnly": volume.readOnly,
        }
        for volume in spec.volumes
    ]
    # Swarm has no shm_size: a sized tmpfs on /dev/shm is the documented replacement.
    mounts.append(
        {"Type": "tmpfs", "Target": "/dev/shm", "TmpfsOptions": {"SizeBytes": spec.shm_size_bytes}}
    )
    health = spec.healthCheck
    port = seat.ports.api if seat is not None else spec.engine.port
    healthcheck: dict[str, Any] = {
        "Test": health_command(port, health.path, health.timeoutSeconds),
        "Interval": health.intervalSeconds * SECOND_NS,
        "Timeout": health.timeoutSeconds * SECOND_NS,
        "Retries": health.retries,
        "StartPeriod": health.startPeriodSeconds * SECOND_NS,
    }
    if seat is not None and seat.member > 0:
        # A headless member serves no HTTP: its group's health is its leader's.
        healthcheck = {"Test": ["NONE"]}
    return {
        "Image": spec.image,
        "Command": ["vllm"],
        "Args": vllm_args(md, seat),
        "Env": container_env(md, npus, group_env(seat, hccl_interface) if seat else None),
        # The owner uid stays off the task: a re-created ModelDeployment adopts its running
        # replicas instead of restarting every one of them.
        "Labels": {k: v for k, v in replica_labels.items() if k != labels.OWNER_UID},
        "Mounts": mounts,
        "Init": True,
        "Healthcheck": healthcheck,
    }


def _task_template(md: ModelDeployment, node_id: str, container: dict[str, Any]) -> dict[str, Any]:
    spec = md.spec
    task_template: dict[str, Any] = {
        "ContainerSpec": container,
        "Placement": {"Constraints": [f"node.id=={node_id}"]},
        "RestartPolicy": {
            "Condition": spec.restartPolicy.condition,
            "Delay": spec.restartPolicy.delaySeconds * SECOND_NS,
            "MaxAttempts": spec.restartPolicy.maxAttempts,
        },
    }
    if spec.network is not None:
        # Networks belong in the task template; the top-level field is deprecated.
        task_template["Networks"] = [{"Target": spec.network.name, "Aliases": [network_alias(md)]}]
    return task_template


def _endpoint_spec(md: ModelDeployment) -> dict[str, Any]:
    spec = md.spec
    endpoint: dict[str, Any] = {
        "Mode": spec.network.endpointMode if spec.network is not None else "vip"
    }
    if spec.publish is not None:
        endpoint["Ports"] = [
            {
                "Protocol": "tcp",
                "TargetPort": spec.engine.port,
                "PublishedPort": spec.publish.port,
                "PublishMode": spec.publish.mode,
            }
        ]
    return endpoint


def spec_hash(rendered: dict[str, Any]) -> str:
    """A stable digest of what npuswarm renders, so a changed spec is told apart from hand edits."""
    comparable = essential(rendered)
    comparable["Labels"].pop(labels.SPEC_HASH, None)
    comparable["ContainerLabels"].pop(labels.SPEC_HASH, None)
    blob = json.dumps(comparable, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def essential(spec: dict[str, Any]) -> dict[str, Any]:
    """The fields npuswarm sets, in one canonical form, for rendered and observed specs alike.

    Swarm fills in defaults and reorders lists on its side; comparing only this projection
    keeps an unchanged service from looking changed (which would restart a loaded model).
    """
    template = spec.get("TaskTemplate") or {}
    container = template.get("ContainerSpec") or {}
    health = container.get("Healthcheck") or {}
    restart = template.get("RestartPolicy") or {}
    endpoint = spec.get("EndpointSpec") or {}
    return {
        "Name": spec.get("Name"),
        # The uid records which object created the service; it is not a reason to rewrite it.
        "Labels": {k: v for k, v in (spec.get("Labels") or {}).items() if k != labels.OWNER_UID},
        "Image": container.get("Image"),
        "Command": list(container.get("Command") or []),
        "Args": list(container.get("Args") or []),
        "Env": sorted(container.get("Env") or []),
        "ContainerLabels": dict(container.get("Labels") or {}),
        "Mounts": sorted(
            (
                {
                    "Type": mount.get("Type", "bind"),
                    "Source": mount.get("Source", ""),
                    "Target": mount.get("Target"),
                    "ReadOnly": bool(mount.get("ReadOnly", False)),
                    "SizeBytes": (mount.get("TmpfsOptions") or {}).get("SizeBytes", 0),
                }
                for mount in container.get("Mounts") or []
            ),
            key=lambda m: (str(m["Target"]), str(m["Source"])),
        ),
        "Init": bool(container.get("Init", False)),
        "Healthcheck": {
            "Test": list(health.get("Test") or []),
            "Interval": health.get("Interval", 0),
            "Timeout": health.get("Timeout", 0),
            "Retries": health.get("Retries", 0),
            "StartPeriod": health.get("StartPeriod", 0),
        },
        "Constraints": sorted((template.get("Placement") or {}).get("Constraints") or []),
        "Restart": {
            "Condition": restart.get("Condition", "any"),
            "Delay": restart.get("Delay", 0),
            "MaxAttempts": restart.get("MaxAttempts", 0),
        },
        "Networks": sorted(
            (network.get("Target"), tuple(sorted(network.get("Aliases") or [])))
            for network in template.get("Networks") or []
        ),
        "Replicas": ((spec.get("Mode") or {}).get("Replicated") or {}).get("Replicas"),
        "EndpointMode": endpoint.get("Mode", "vip"),
        "Ports": sorted(
            (
                port.get("Protocol", "tcp"),
                port.get("TargetPort"),
                port.get("PublishedPort"),
                port.get("PublishMode", "ingress"),
            )
            for port in endpoint.get("Ports") or []
        ),
    }


class Renderer:
    """render_service and essential for one installation, remembered across passes: between
    two passes almost no deployment and no service changes, and rendering and comparing
    thousands of specs again would dominate a pass. Results are shared: never mutate them."""

    def __init__(
        self,
        instance: str = labels.DEFAULT_INSTANCE,
        stop_grace_seconds: float = DEFAULT_STOP_GRACE_SECONDS,
        hccl_interface: str = "",
    ) -> None:
        self.instance = instance
        self.stop_grace_seconds = stop_grace_seconds
        self.hccl_interface = hccl_interface
        self._rendered: dict[tuple[Any, ...], tuple[dict[str, Any], dict[str, Any]]] = {}
        self._observed: dict[tuple[str, int], dict[str, Any]] = {}
        self._previous: tuple[dict[Any, Any], dict[Any, Any]] = ({}, {})
        # id of a spec this pass returned -> its essential projection (the cache holds the
        # spec, so the id stays its own while it is in here).
        self._essentials: dict[int, dict[str, Any]] = {}

    def new_pass(self) -> None:
        """Keep what the last pass used, drop the rest: the memory follows the fleet."""
        self._previous = (self._rendered, self._observed)
        self._rendered, self._observed, self._essentials = {}, {}, {}

    def render(
        self, md: ModelDeployment, assignment: Assignment, name: str | None = None
    ) -> dict[str, Any]:
        return self._render(md, assignment, name)[0]

    def matches(
        self, service_id: str, version: int, observed: dict[str, Any], rendered: dict[str, Any]
    ) -> bool:
        """Whether an observed service (its id, Swarm version and spec) already is
        ``rendered`` (a spec this renderer returned)."""
        key = (service_id, version)
        seen = self._observed.get(key) or self._previous[1].get(key)
        if seen is None:
            seen = essential(observed)
        self._observed[key] = seen
        wanted = self._essentials.get(id(rendered))
        return seen == (wanted if wanted is not None else essential(rendered))

    def _render(
        self, md: ModelDeployment, assignment: Assignment, name: str | None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        meta = md.metadata
        key = (
            md.spec.model_dump_json(),
            meta.namespace,
            meta.name,
            meta.uid,
            assignment.slot,
            assignment.node_id,
            assignment.npus,
            assignment.group,
            name,
        )
        entry = self._rendered.get(key) or self._previous[0].get(key)
        if entry is None:
            spec = render_service(
                md,
                assignment,
                name=name,
                instance=self.instance,
                stop_grace_seconds=self.stop_grace_seconds,
                hccl_interface=self.hccl_interface,
            )
            entry = (spec, essential(spec))
        self._rendered[key] = entry
        self._essentials[id(entry[0])] = entry[1]
        return entry


@dataclass(frozen=True)
class SlotSpec:
    """Step 3's answer for one placed replica: the spec it wants, the service that spec is
    compared with (None: there is none, create it), and every service found for the slot."""

    slot: str
    spec: dict[str, Any]
    primary: ObservedService | None
    services: list[ObservedService]
    # The slot holds an old copy and a surge copy (maxSurge) and ``primary`` is the surge copy
    # that is up to date: the others go once it is ready, and nothing is rendered anew.
    settled: bool = False


def render_slots(
    md: ModelDeployment,
    assignments: list[Assignment],
    by_slot: Mapping[str, list[ObservedService]],
    snapshot: SwarmSnapshot,
    renderer: Renderer,
) -> dict[str, SlotSpec]:
    """Each placed replica's spec, in slot order. A slot keeps its service's name (Swarm cannot
    rename one); a new one gets a name no service of the Swarm has."""
    slots: dict[str, SlotSpec] = {}
    for assignment in assignments:
        slot = assignment.slot
        services = sorted(by_slot.get(slot, []), key=lambda s: s.name)
        if len(services) > 1:
            current = [s for s in services if _up_to_date(md, s, renderer)]
            if current:
                newest = current[0]
                allocation = newest.allocation()
                assert allocation is not None  # _up_to_date renders from the allocation
                spec = renderer.render(md, allocation.kept(), name=newest.name)
                slots[slot] = SlotSpec(slot, spec, newest, services, settled=True)
                continue
        primary = next((s for s in services if s.name == service_name(md, slot)), None)
        if primary is None and services:
            primary = services[0]
        name = primary.name if primary else free_service_name(md, slot, snapshot.names())
        slots[slot] = SlotSpec(slot, renderer.render(md, assignment, name=name), primary, services)
    return slots


def _up_to_date(md: ModelDeployment, service: ObservedService, renderer: Renderer) -> bool:
    allocation = service.allocation()
    if allocation is None:
        return False
    rendered = renderer.render(md, allocation.kept(), name=service.name)
    return renderer.matches(service.id, service.version, service.spec, rendered)
