"""An in-memory Swarm behind the same interface as npuswarm.swarm.Swarm (reconcile.SwarmAPI).

It keeps Engine API JSON, so the pass reads it through the real snapshot_from_engine; it
counts every call, and can refuse writes, fail reads, or run a service's task on request.
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from typing import Any

from npuswarm.api import labels
from npuswarm.core.snapshot import SwarmSnapshot, snapshot_from_engine
from npuswarm.swarm import SwarmRejected, SwarmUnavailable

from .builders import engine_node


class MemorySwarm:
    def __init__(self, nodes: int = 2, npus: int = 8, instance: str = labels.DEFAULT_INSTANCE) -> None:
        self.nodes = [
            engine_node(f"node{i}", f"host{i}", npus=[f"davinci{n}" for n in range(npus)])
            for i in range(1, nodes + 1)
        ]
        self.services: dict[str, dict[str, Any]] = {}
        self.tasks: list[dict[str, Any]] = []
        self.networks = [{"Id": "net-id", "Name": "vllm-net"}]
        self.secrets: dict[str, dict[str, Any]] = {}
        self.secret_data: dict[str, bytes] = {}  # by name: Swarm never gives it back
        self.instance = instance
        self.calls: Counter[str] = Counter()
        self.refuse: dict[str, str] = {}  # service name -> error for its next writes
        self.down = False
        self.reachable: bool | None = None
        self._ids = itertools.count(1)
        # Removed services' tasks keep running until finish_stopping() (a stop grace period).
        self.stop_grace = False

    # -- the interface ------------------------------------------------------------------

    def observe(self) -> SwarmSnapshot:
        for kind in ("list_nodes", "list_services", "list_tasks", "list_networks"):
            self._call(kind)
        return snapshot_from_engine(
            copy.deepcopy(self.nodes),
            copy.deepcopy(list(self.services.values())),
            copy.deepcopy(self.tasks),
            self.networks,
            self.instance,
        )

    def create_service(self, spec: dict[str, Any]) -> str:
        self._call("create_service", spec["Name"])
        if any(s["Spec"]["Name"] == spec["Name"] for s in self.services.values()):
            raise SwarmRejected(f"create_service: name {spec['Name']} is already in use")
        service_id = f"svc{next(self._ids)}"
        self.services[service_id] = {"ID": service_id, "Version": {"Index": 1}, "Spec": copy.deepcopy(spec)}
        return service_id

    def update_service(self, service_id: str, version: int, spec: dict[str, Any]) -> None:
        self._call("update_service", spec["Name"])
        service = self.services[service_id]
        if version != service["Version"]["Index"]:
            raise SwarmRejected("update_service: update out of sequence")
        service["Spec"] = copy.deepcopy(spec)
        service["Version"]["Index"] += 1

    def remove_service(self, service_id: str) -> None:
        name = self.services.get(service_id, {}).get("Spec", {}).get("Name", "")
        self._call("remove_service", name)
        self.services.pop(service_id, None)
        if self.stop_grace:
            # As Swarm does: the task stays listed, desired state "remove", until it exits.
            for task in self.tasks:
                if task["ServiceID"] == service_id:
                    task["DesiredState"] = "remove"
            return
        self.tasks = [t for t in self.tasks if t["ServiceID"] != service_id]

    def finish_stopping(self) -> None:
        """The tasks of removed services have exited (their stop grace is over)."""
        self.tasks = [t for t in self.tasks if t["DesiredState"] != "remove"]

    def create_network(self, name: str, network_labels: dict[str, str]) -> None:
        self._call("create_network", name)
        self.networks.append({"Id": f"net-{name}", "Name": name, "Labels": dict(network_labels),
                              "Scope": "swarm", "Driver": "overlay"})

    def remove_network(self, network_id: str) -> None:
        self._call("remove_network")
        self.networks = [n for n in self.networks if n["Id"] != network_id]

    def owned_services(self, namespace: str, name: str) -> list[dict[str, Any]]:
        self._call("list_services")
        return [
            copy.deepcopy(s)
            for s in self.services.values()
            if s["Spec"]["Labels"].get(labels.OWNER_NAMESPACE) == namespace
            and s["Spec"]["Labels"].get(labels.OWNER_NAME) == name
        ]

    def services_labelled(self, *label: str) -> list[dict[str, Any]]:
        self._call("list_services")
        wanted = [item.partition("=")[::2] for item in label]
        return [
            copy.deepcopy(s)
            for s in self.services.values()
            if all(s["Spec"]["Labels"].get(key) == value for key, value in wanted)
        ]

    def secrets_labelled(self, *label: str) -> list[dict[str, Any]]:
        self._call("list_secrets")
        return [copy.deepcopy(s) for s in self.secrets.values() if _labelled(s["Spec"]["Labels"], label)]

    def create_secret(self, name: str, data: bytes, secret_labels: dict[str, str]) -> str:
        self._call("create_secret", name)
        if any(s["Spec"]["Name"] == name for s in self.secrets.values()):
            raise SwarmRejected(f"create_secret: secret {name} already exists")
        secret_id = f"sec{next(self._ids)}"
        self.secrets[secret_id] = {"ID": secret_id, "Spec": {"Name": name, "Labels": dict(secret_labels)}}
        self.secret_data[name] = data
        return secret_id

    def remove_secret(self, secret_id: str) -> None:
        self._call("remove_secret")
        users = [
            s["Spec"]["Name"]
            for s in self.services.values()
            for ref in s["Spec"]["TaskTemplate"]["ContainerSpec"].get("Secrets") or []
            if ref["SecretID"] == secret_id
        ]
        if users:
            raise SwarmRejected(f"remove_secret: secret is in use by the following service: {users[0]}")
        self.secrets.pop(secret_id, None)

    def set_node_label(self, node_id: str, key: str, value: str) -> None:
        self._call("update_node", node_id)
        node = next(n for n in self.nodes if n["ID"] == node_id)
        node["Spec"].setdefault("Labels", {})[key] = value

    def ping(self) -> bool:
        return not self.down

    # -- what a test does to it ----------------------------------------------------------

    def add_service(self, spec: dict[str, Any], *, node_id: str | None = None) -> str:
        """A service npuswarm did not make (e.g. a stack's), with a running task on node_id."""
        service_id = f"other{next(self._ids)}"
        self.services[service_id] = {"ID": service_id, "Version": {"Index": 1}, "Spec": spec}
        if node_id is not None:
            self.tasks.append(
                {
                    "ID": f"task-{service_id}",
                    "ServiceID": service_id,
                    "NodeID": node_id,
                    "DesiredState": "running",
                    "CreatedAt": "2026-11-30T11:00:00Z",
                    "Status": {"State": "running", "Timestamp": "2026-11-30T11:00:00Z"},
                    "Spec": {"ContainerSpec": {"Labels": {}}},
                }
            )
        return service_id

    def run_all(self, state: str = "running") -> None:
        """Every npuswarm service's task runs its current spec (as Swarm would, in time)."""
        self.tasks = [
            t
            for t in self.tasks
            if t["ServiceID"] not in self.services or t["ID"].startswith("task-") or t["DesiredState"] == "remove"
        ]
        self.tasks = [t for t in self.tasks if t["ServiceID"] not in self.services or not t["ID"].startswith("t-")]
        for service_id, service in self.services.items():
            spec = service["Spec"]
            if labels.NODE not in spec["Labels"]:
                continue
            self.tasks.append(
                {
                    "ID": f"t-{service_id}-{service['Version']['Index']}",
                    "ServiceID": service_id,
                    "NodeID": spec["Labels"][labels.NODE],
                    "DesiredState": "running",
                    "CreatedAt": "2026-11-30T11:00:00Z",
                    "Status": {"State": state, "Timestamp": "2026-11-30T11:00:00Z"},
                    "Spec": {"ContainerSpec": {"Labels": spec["TaskTemplate"]["ContainerSpec"]["Labels"]}},
                }
            )

    def by_name(self) -> dict[str, dict[str, Any]]:
        return {s["Spec"]["Name"]: s for s in self.services.values()}

    def writes(self) -> int:
        return sum(self.calls[k] for k in ("create_service", "update_service", "remove_service"))

    def _call(self, kind: str, name: str = "") -> None:
        self.calls[kind] += 1
        if self.down:
            raise SwarmUnavailable(f"{kind}: connection refused")
        if name in self.refuse and kind != "list_services":
            raise SwarmRejected(f"{kind}: {self.refuse[name]}")


def _labelled(found: dict[str, str], wanted: tuple[str, ...]) -> bool:
    """Docker's label filter: ``key`` (present) or ``key=value``."""
    for item in wanted:
        key, equals, value = item.partition("=")
        if key not in found or (equals and found[key] != value):
            return False
    return True
