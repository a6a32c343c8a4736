"""One reusable invariant checker, run after every chaos/race scenario (issue 12).

`violations(docker_client, kubectl_json, instance)` returns a list of messages, empty when:
- no NPU (node, index) is held by two tasks in a pending..running state, npuswarm's or
  anyone's (ASCEND_VISIBLE_DEVICES of the service env, on the task's NodeID);
- every service of this installation belongs to an existing ModelDeployment and no two
  services serve one (deployment, replica);
- each deployment's status (placedReplicas, npus) matches the services Swarm has (a
  multi-node replica is one replica of nodesPerReplica services).

Ownership is compared by namespace/name. The uid label is compared only when the
owner was never re-created: a ModelDeployment deleted and created again under the same name
adopts its services and keeps the old uid label (render.essential ignores it), so a uid
mismatch there is expected, not a leak. Callers pass `recreated` for such names.

`foreign_snapshot` / `foreign_changes`: services not of this installation, (id -> version,
spec); after a scenario none may be changed or removed by npuswarm.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

LIVE_STATES = {"new", "pending", "assigned", "accepted", "preparing", "ready", "starting", "running"}
PREFIX = "npuswarm.io"


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service["Spec"].get("TaskTemplate", {}).get("ContainerSpec", {}).get("Env") or []
    return dict(e.split("=", 1) if "=" in e else (e, "") for e in env)


def _devices(value: str) -> list[str]:
    return [d.strip() for d in value.split(",") if d.strip()]


def instance_of(service: dict[str, Any]) -> str | None:
    labels = service["Spec"].get("Labels") or {}
    if labels.get(f"{PREFIX}/managed-by") != "npuswarm":
        return None
    return labels.get(f"{PREFIX}/instance", "default")


def npu_conflicts(client: Any, label: str | None = None) -> list[str]:
    """Over the whole Swarm, or over the services with `label`."""
    listed = client.services(filters={"label": label}) if label else client.services()
    services = {s["ID"]: s for s in listed}
    holders: dict[tuple[str, str], list[str]] = {}
    for task in client.tasks():
        if task.get("Status", {}).get("State") not in LIVE_STATES or not task.get("NodeID"):
            continue
        service = services.get(task["ServiceID"])
        if service is None and task.get("DesiredState") == "remove" and not label:
            # A removed service's task still stopping (its stop grace) holds its NPUs until
            # it exits: its own spec says which.
            service = {"Spec": {"Name": f"removed:{task['ServiceID'][:10]}",
                                "TaskTemplate": task.get("Spec") or {}}}
        if task.get("DesiredState") not in {"running", "ready", "accepted", "remove"}:
            continue
        if service is None:
            continue
        service_labels = service["Spec"].get("Labels") or {}
        if f"{PREFIX}/npu-health-probe" in service_labels or f"{PREFIX}/node-agent" in service_labels:
            continue  # npuswarm's node agent (and the earlier health probe) reads npu-smi only
        for device in _devices(_env(service).get("ASCEND_VISIBLE_DEVICES", "")):
            holders.setdefault((task["NodeID"], device), []).append(
                f"{service['Spec']['Name']}/{task['ID'][:10]}")
    return [f"NPU {device} on node {node[:10]} held by {len(who)} tasks: {', '.join(sorted(who))}"
            for (node, device), who in sorted(holders.items()) if len(who) > 1]


def ownership(client: Any, deployments: Iterable[dict[str, Any]], instance: str,
              recreated: set[tuple[str, str]] = frozenset()) -> list[str]:  # type: ignore[assignment]
    mds = {(d["metadata"]["namespace"], d["metadata"]["name"]): d for d in deployments}
    found: list[str] = []
    seen: dict[tuple[str, str, str], str] = {}
    mine: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for service in client.services(filters={"label": f"{PREFIX}/managed-by=npuswarm"}):
        if instance_of(service) != instance:
            continue
        labels = service["Spec"]["Labels"]
        name = service["Spec"]["Name"]
        key = (labels.get(f"{PREFIX}/owner-namespace", ""), labels.get(f"{PREFIX}/owner-name", ""))
        md = mds.get(key)
        if md is None:
            found.append(f"service {name} belongs to no ModelDeployment ({key[0]}/{key[1]})")
            continue
        if key not in recreated and labels.get(f"{PREFIX}/owner-uid") != md["metadata"]["uid"]:
            found.append(f"service {name}: owner uid {labels.get(f'{PREFIX}/owner-uid')} is not "
                         f"{key[0]}/{key[1]}'s {md['metadata']['uid']}")
        replica = (key[0], key[1], labels.get(f"{PREFIX}/replica", "?"))
        if replica in seen:
            found.append(f"two services for {'/'.join(replica)}: {seen[replica]} and {name}")
        seen[replica] = name
        mine.setdefault(key, []).append(service)
    for key, md in sorted(mds.items()):
        status = md.get("status") or {}
        if status.get("observedGeneration") != md["metadata"]["generation"]:
            continue  # not yet observed: nothing to compare (callers wait for convergence)
        services = mine.get(key, [])
        npus = sum(len(_devices(s["Spec"]["Labels"].get(f"{PREFIX}/npus", ""))) for s in services)
        # A multi-node replica is one replica of nodesPerReplica member services.
        members = int((md.get("spec") or {}).get("nodesPerReplica") or 1)
        if status.get("placedReplicas", 0) * members != len(services):
            per = f" ({members} services each)" if members > 1 else ""
            found.append(f"{key[0]}/{key[1]}: status.placedReplicas={status.get('placedReplicas')}"
                         f"{per} but Swarm has {len(services)} services")
        if status.get("npus", 0) != npus:
            found.append(f"{key[0]}/{key[1]}: status.npus={status.get('npus')} but its services hold {npus}")
    return found


def foreign_snapshot(client: Any, instance: str, label: str | None = None) -> dict[str, tuple[int, Any]]:
    """Services not of this installation (optionally only those with `label`): id ->
    (version, spec)."""
    listed = client.services(filters={"label": label}) if label else client.services()
    return {s["ID"]: (s["Version"]["Index"], s["Spec"]) for s in listed if instance_of(s) != instance}


def foreign_changes(client: Any, before: dict[str, tuple[int, Any]], instance: str) -> list[str]:
    """Services of `before` that are gone or whose Spec changed. The Spec, not the version, is
    compared: Swarm bumps the version by itself (e.g. when a rollout completes). On a shared
    Swarm other sessions remove their own services, so snapshot (with `label`) only the
    foreign services the scenario itself created."""
    now = {s["ID"]: s["Spec"] for s in client.services()}
    found = []
    for sid, (_, spec) in before.items():
        if sid not in now:
            found.append(f"foreign service {spec['Name']} ({sid[:10]}) was removed")
        elif now[sid] != spec:
            found.append(f"foreign service {spec['Name']} ({sid[:10]}) was changed")
    return found


def violations(client: Any, kubectl_json: Callable[[], list[dict[str, Any]]], instance: str,
               recreated: set[tuple[str, str]] = frozenset(),  # type: ignore[assignment]
               foreign_before: dict[str, tuple[int, Any]] | None = None) -> list[str]:
    """Every invariant; `kubectl_json()` returns all ModelDeployments (items of `get md -A`)."""
    found = npu_conflicts(client) + ownership(client, kubectl_json(), instance, recreated)
    if foreign_before is not None:
        found += foreign_changes(client, foreign_before, instance)
    return found
