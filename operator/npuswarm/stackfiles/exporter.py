"""Export: the services npuswarm would create (render.render_service output) as a compose
file, for review or as a way back to `docker stack deploy`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import yaml

from npuswarm.api import labels
from npuswarm.api.deployment import ModelDeployment
from npuswarm.core.pipeline import plan_pass
from npuswarm.core.snapshot import SwarmSnapshot
from npuswarm.stackfiles.compose import COMPOSE_VERSION, EXTENSION, escape, go_duration

# --- Export -----------------------------------------------------------------------------------


def export_stack(
    deployments: Sequence[ModelDeployment],
    rendered: Mapping[str, Mapping[str, dict[str, Any]]],
    unplaced: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """A compose file of the rendered services: ``rendered[md.key][slot]`` is a ServiceSpec.

    Compose can express the NPUs (ASCEND_VISIBLE_DEVICES, applied by Ascend Docker Runtime as
    the default runtime), the node pin (node.id), the /dev/shm tmpfs and init. What it cannot
    (the deployment a replica belongs to, its mode and update strategy) is kept under
    ``x-npuswarm``, which import_stack reads back.
    """
    unplaced = unplaced or {}
    blocks: list[str] = []
    networks: set[str] = set()
    services = 0
    for md in deployments:
        for slot, spec in sorted(rendered.get(md.key, {}).items()):
            service = compose_service(md, spec)
            networks.update(service.get("networks", {}))
            blocks.append(_service_block(md, slot, spec, service))
            services += 1
        blocks += [f"  # {md.key}: NOT PLACED: {message}\n" for message in unplaced.get(md.key, [])]
    # Comments alone under `services:` would make it null, which compose rejects.
    text = _EXPORT_HEADER + f'version: "{COMPOSE_VERSION}"\n'
    text += "services:" + ("\n" if services else " {}\n") + "".join(blocks)
    if networks:
        # npuswarm attaches to existing networks; a stack must not create or remove them.
        top = {name: {"external": True} for name in sorted(networks)}
        text += yaml.safe_dump({"networks": top}, sort_keys=False)
    return text


_EXPORT_HEADER = """\
# Written by `npuswarm export-stack`: the services npuswarm would run for the current placement.
# One service per replica, pinned with node.id and given its NPUs through ASCEND_VISIBLE_DEVICES
# (Ascend Docker Runtime must be each node's default runtime). This freezes today's placement:
# nothing moves a replica when its node fails, and PerNode deployments do not grow to new nodes.
# The npuswarm ownership labels are left out (see x-npuswarm), so a running npuswarm neither
# adopts nor removes these services, and it does not see their NPUs as taken: do not run both.
"""


def _service_block(
    md: ModelDeployment, slot: str, spec: Mapping[str, Any], service: dict[str, Any]
) -> str:
    npus = spec["Labels"].get(labels.NPUS, "")
    comment = f"  # {md.key} replica {slot}: node {spec['Labels'].get(labels.NODE)}, NPUs {npus}\n"
    body = yaml.safe_dump({spec["Name"]: service}, sort_keys=False, default_flow_style=False)
    return comment + "".join(f"  {line}\n" for line in body.splitlines())


def compose_service(md: ModelDeployment, spec: Mapping[str, Any]) -> dict[str, Any]:
    """One rendered ServiceSpec as a compose service (`$` escaped: compose would expand it)."""
    template = spec["TaskTemplate"]
    container = template["ContainerSpec"]
    service: dict[str, Any] = {
        "image": container["Image"],
        "entrypoint": list(container.get("Command") or []),
        "command": list(container.get("Args") or []),
        "environment": dict(item.split("=", 1) for item in container.get("Env") or []),
        "init": bool(container.get("Init", False)),
        "volumes": [_compose_mount(mount) for mount in container.get("Mounts") or []],
    }
    health = container.get("Healthcheck")
    if health and list(health.get("Test") or []) == ["NONE"]:
        # A headless member of a multi-node replica serves no HTTP (docs/multi-node.md).
        service["healthcheck"] = {"disable": True}
    elif health:
        service["healthcheck"] = {
            "test": list(health["Test"]),
            "interval": go_duration(health["Interval"]),
            "timeout": go_duration(health["Timeout"]),
            "retries": health["Retries"],
            "start_period": go_duration(health["StartPeriod"]),
        }
    if template.get("Networks"):
        service["networks"] = {
            net["Target"]: {"aliases": list(net.get("Aliases") or [])}
            for net in template["Networks"]
        }
    ports = (spec.get("EndpointSpec") or {}).get("Ports") or []
    if ports:
        service["ports"] = [
            {
                "target": p["TargetPort"],
                "published": p["PublishedPort"],
                "protocol": p.get("Protocol", "tcp"),
                "mode": p.get("PublishMode", "ingress"),
            }
            for p in ports
        ]
    service["deploy"] = _compose_deploy(md, spec)
    service = escape(service)
    service[EXTENSION] = _extension(md, spec)
    return service


def _compose_mount(mount: Mapping[str, Any]) -> dict[str, Any]:
    if mount.get("Type") == "tmpfs":
        size = (mount.get("TmpfsOptions") or {}).get("SizeBytes", 0)
        return {"type": "tmpfs", "target": mount["Target"], "tmpfs": {"size": size}}
    return {
        "type": "bind",
        "source": mount["Source"],
        "target": mount["Target"],
        "read_only": bool(mount.get("ReadOnly", False)),
    }


def _compose_deploy(md: ModelDeployment, spec: Mapping[str, Any]) -> dict[str, Any]:
    template = spec["TaskTemplate"]
    restart = template.get("RestartPolicy") or {}
    update = spec.get("UpdateConfig") or {}
    # nodeSelector is not in the rendered spec (placement applied it); kept so it round-trips.
    selector = [f"node.labels.{k}=={v}" for k, v in sorted(md.spec.nodeSelector.items())]
    deploy: dict[str, Any] = {
        "mode": "replicated",
        "replicas": ((spec.get("Mode") or {}).get("Replicated") or {}).get("Replicas", 1),
        "endpoint_mode": (spec.get("EndpointSpec") or {}).get("Mode", "vip"),
        "placement": {
            "constraints": list((template.get("Placement") or {}).get("Constraints") or [])
            + selector
        },
        "restart_policy": {
            "condition": restart.get("Condition", "any"),
            "delay": go_duration(restart.get("Delay", 0)),
            "max_attempts": restart.get("MaxAttempts", 0),
        },
    }
    if update:
        deploy["update_config"] = {
            "parallelism": update.get("Parallelism", 1),
            "order": update.get("Order", "stop-first"),
            "failure_action": update.get("FailureAction", "pause"),
        }
    return deploy


def _extension(md: ModelDeployment, spec: Mapping[str, Any]) -> dict[str, Any]:
    service_labels = spec.get("Labels") or {}
    extension: dict[str, Any] = {
        "deployment": md.key,
        "replica": service_labels.get(labels.REPLICA),
        "node": service_labels.get(labels.NODE),
        "npus": service_labels.get(labels.NPUS),
        "mode": md.spec.mode,
    }
    if md.spec.mode == "Replicated":
        extension["replicas"] = md.spec.replicas
    extension["updateStrategy"] = md.spec.updateStrategy.model_dump()
    if md.spec.npuIds is not None:
        # The env shows this replica's NPUs either way; only this says they were pinned.
        extension["npuIds"] = list(md.spec.npuIds)
    return extension


def planned_services(
    deployments: Sequence[ModelDeployment],
    snapshot: SwarmSnapshot,
    now: datetime,
    lost_node_grace_seconds: float,
) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, list[str]]]:
    """The rendered services of every deployment, from one placement of them all."""
    whole = plan_pass(
        list(deployments), snapshot, now=now, lost_node_grace_seconds=lost_node_grace_seconds
    )
    rendered: dict[str, dict[str, dict[str, Any]]] = {}
    unplaced: dict[str, list[str]] = {}
    for md in deployments:
        plan = whole.plans[md.key]
        rendered[md.key] = plan.desired
        unplaced[md.key] = _unplaced_messages(
            whole.placement.unplaced.get(r.key) for r in plan.requests
        )
    return rendered, unplaced


def _unplaced_messages(items: Iterable[Any]) -> list[str]:
    return [f"replica {u.slot}: {u.reason}: {u.message}" for u in items if u is not None]
