#!/usr/bin/env python3
"""A synthetic Docker Engine API (Swarm manager, API 1.41) for benchmarks: no containers.

Serves what npuswarm asks of Swarm, in the shapes Engine 20.10 returns, to the real docker-py
client over HTTP, at sizes no test machine could run for real (1,000 nodes x 8 NPUs):

    python bench/enginesim.py --nodes 1000 --port 2375
    DOCKER_HOST=tcp://127.0.0.1:2375 npuswarm run --standalone

or, in Python::

    with EngineSim(nodes=50).start() as sim:
        docker.APIClient(base_url=sim.url, version="auto").services()

Docker API: GET /_ping /version /info /nodes /nodes/{id} /services (and ?status=true)
/services/{id} /tasks /tasks/{id} /networks /networks/{id} /events (chunked JSON lines);
POST /services/create /services/{id}/update?version=N (a stale N gets 500 "update out of
sequence", as from Swarm) /nodes/{id}/update?version=N; DELETE /services/{id}.
Secrets: POST /secrets/create (Name, Labels, Data kept; never served back), GET /secrets
/secrets/{id}, DELETE /secrets/{id} (refused while a service mounts it); a service that
mounts a secret that does not exist is refused, as by Swarm.
List filters: services id, name, label, mode; tasks id, name, service, node, desired-state,
label; nodes id, name, role, membership, node.label; networks id, name, driver, scope;
secrets id, name, names, label. An optional /v1.NN prefix is accepted.

Every node's Status.Addr is its own address in 127.1.0.0/16 (all of 127/8 is loopback on
Linux). With ``--agent-port P`` (or ``start_agents(P)``) the node agents' port answers there
as npuswarm's node agents do (bench/agentsim.py: needs npuswarm importable).

A scheduler stands in for Swarm's: every replica slot of a service gets a task on a node that
satisfies its constraints (node.id / node.hostname / node.role / node.labels.*, == and !=),
``assigned`` at once and ``running`` after ``task_delay`` seconds; an update whose task
template changed shuts the old task down (stop-first) and starts a new one; a node that goes
down keeps its tasks ``running`` but desired ``shutdown`` and their replacements ``pending``
("no suitable node") until it is back. Five tasks per slot are kept, as Swarm's default
task history. Service and node events go out on /events as Engine 20.10 writes them.

Benchmark controls, outside the Docker API (never counted):
  GET  /sim/stats                     requests per "METHOD /route", bytes sent, object counts
  POST /sim/reset                     zero the counters
  GET  /sim/services                  [{ID, Name, Labels, Version, Image, Running, ..}]
  POST /sim/nodes/{id|hostname}/down  (and /up): the node's state, with a node event
  POST /sim/nodes/{id|hostname}/npus/{n}/health?state=Critical
                                      what that node's npu-smi reports for NPU n (OK clears)
  POST /sim/seed?count=M&prefix=P     M services (one replica, running at once), spread over
                                      the nodes; an optional JSON body gives Labels
  DELETE /sim/services/{id|name}      remove a service "by hand"

List responses are serialized once per state change, so the server's own CPU stays small
next to a client that lists 2,000 services and their tasks.
"""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import heapq
import itertools
import json
import re
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

API_VERSION = "1.41"
ENGINE_VERSION = "20.10.24"
OUT_OF_SEQUENCE = "rpc error: code = Unknown desc = update out of sequence"
TASK_HISTORY = 5  # Swarm's default task-history-limit per slot
EVENT_BUFFER = 1024
LIST_ROUTES = ("GET /nodes", "GET /services", "GET /tasks", "GET /networks")
WRITE_METHODS = ("POST", "DELETE")
_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def swarm_id(seed: str) -> str:
    """A 25-character lowercase id like Swarm's, stable for a given seed."""
    number = int.from_bytes(hashlib.sha256(seed.encode()).digest()[:16], "big")
    chars = []
    for _ in range(25):
        number, digit = divmod(number, 36)
        chars.append(_ALPHABET[digit])
    return "".join(chars)


def engine_time(ns: int | None = None) -> str:
    """RFC 3339 with nanoseconds, as Engine prints CreatedAt and friends."""
    ns = time.time_ns() if ns is None else ns
    seconds, nanos = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanos:09d}Z"


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --- filters -------------------------------------------------------------------------------


def parse_filters(text: str | None) -> dict[str, list[str]]:
    """Engine's filters parameter: {"k": ["v", ...]} or the older {"k": {"v": true}}."""
    if not text:
        return {}
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise ApiError(400, f"invalid filter: {error}") from error
    if not isinstance(raw, dict):
        raise ApiError(400, "invalid filter: not an object")
    result: dict[str, list[str]] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            result[key] = [k for k, on in value.items() if on]
        elif isinstance(value, list):
            result[key] = [str(v) for v in value]
        else:
            result[key] = [str(value)]
    return result


def labels_match(labels: dict[str, str] | None, wanted: list[str]) -> bool:
    """Every ``key`` or ``key=value`` in wanted holds (Engine ANDs label filters)."""
    labels = labels or {}
    for item in wanted:
        key, eq, value = item.partition("=")
        if key not in labels or (eq and labels[key] != value):
            return False
    return True


def _any_prefix(value: str, prefixes: list[str]) -> bool:
    return any(value.startswith(p) for p in prefixes)


_CONSTRAINT = re.compile(r"^\s*([\w.\-/]+)\s*(==|!=)\s*(.*?)\s*$")


def node_satisfies(node: dict[str, Any], constraints: Iterable[str]) -> bool:
    for constraint in constraints:
        match = _CONSTRAINT.match(constraint)
        if match is None:
            return False
        key, op, want = match.groups()
        if key == "node.id":
            have: str | None = node["ID"]
        elif key == "node.hostname":
            have = node["Description"]["Hostname"]
        elif key == "node.role":
            have = node["Spec"]["Role"]
        elif key.startswith("node.labels."):
            have = (node["Spec"].get("Labels") or {}).get(key[len("node.labels.") :])
        elif key.startswith("engine.labels."):
            have = (node["Description"]["Engine"].get("Labels") or {}).get(
                key[len("engine.labels.") :]
            )
        elif key == "node.platform.os":
            have = node["Description"]["Platform"]["OS"]
        elif key == "node.platform.arch":
            have = node["Description"]["Platform"]["Architecture"]
        else:
            return False
        if (have == want) != (op == "=="):
            return False
    return True


# --- the simulated manager -----------------------------------------------------------------


@dataclass
class _Cached:
    generation: int
    body: bytes


@dataclass
class SimEvent:
    seq: int
    type: str
    action: str
    actor_id: str
    attributes: dict[str, str]
    time_ns: int
    body: bytes = b""


@dataclass
class Counters:
    requests: Counter[str] = field(default_factory=Counter)
    bytes_sent: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # answers of 400 and up
    since: float = field(default_factory=time.time)


class EngineSim:
    """The state of one simulated Swarm and the HTTP server in front of it."""

    def __init__(
        self,
        nodes: int = 3,
        npus_per_node: int = 8,
        task_delay: float = 0.5,
        networks: Iterable[str] = ("vllm-net",),
    ) -> None:
        self.task_delay = task_delay
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._index = 10  # Swarm's raft index: every write takes the next one
        self._generation = 0  # bumps on every change; list caches are keyed on it
        self._ids = itertools.count()
        self._cache: dict[str, _Cached] = {}
        self._fragments: dict[str, tuple[int, bytes]] = {}  # id -> (Version.Index, JSON)
        self.nodes: dict[str, dict[str, Any]] = {}
        self.services: dict[str, dict[str, Any]] = {}
        self.tasks: dict[str, dict[str, Any]] = {}
        self._by_service: dict[str, dict[str, dict[str, Any]]] = {}  # tasks per service id
        self.networks: dict[str, dict[str, Any]] = {}
        self.secrets: dict[str, dict[str, Any]] = {}  # as listed, plus "Data" (base64)
        # node id -> NPU -> the health its npu-smi reports (/sim/.../health): the simulated
        # node agents (bench/agentsim.py) answer with it.
        self.npu_health: dict[str, dict[int, str]] = {}
        self.npu_health_version = 0
        # (node id, NPU) -> when it turned unhealthy (epoch seconds).
        self.npu_fault_at: dict[tuple[str, int], float] = {}
        self._events: deque[SimEvent] = deque(maxlen=EVENT_BUFFER)
        self._event_seq = 0
        self._timers: list[tuple[float, int, str]] = []
        self._timer_seq = itertools.count()
        self.counters = Counters()
        self._closing = False
        self._server: ThreadingHTTPServer | None = None
        self.agents: Any = None  # bench/agentsim.AgentSim, once start_agents ran
        self._threads: list[threading.Thread] = []
        self.cluster_id = swarm_id("sim-cluster")
        for i in range(nodes):
            self._add_node(i, npus_per_node)
        self._add_builtin_networks(networks)

    # -- set-up --------------------------------------------------------------------------

    def _next_index(self) -> int:
        self._index += 1
        return self._index

    def _new_id(self, kind: str) -> str:
        return swarm_id(f"{kind}-{next(self._ids)}-{id(self)}")

    def _add_node(self, i: int, npus: int) -> None:
        now = engine_time()
        node_id = swarm_id(f"sim-node-{i}")
        manager = i == 0
        node: dict[str, Any] = {
            "ID": node_id,
            "Version": {"Index": self._next_index()},
            "CreatedAt": now,
            "UpdatedAt": now,
            "Spec": {
                "Labels": {},
                "Role": "manager" if manager else "worker",
                "Availability": "active",
            },
            "Description": {
                "Hostname": f"sim-{i + 1:04d}",
                "Platform": {"Architecture": "x86_64", "OS": "linux"},
                "Resources": {
                    "NanoCPUs": 192_000_000_000,
                    "MemoryBytes": 1_622_000_000_000,
                    "GenericResources": [
                        {"NamedResourceSpec": {"Kind": "NPU", "Value": f"davinci{n}"}}
                        for n in range(npus)
                    ],
                },
                "Engine": {
                    "EngineVersion": ENGINE_VERSION,
                    "Labels": {},
                    "Plugins": [
                        {"Type": "Network", "Name": "overlay"},
                        {"Type": "Volume", "Name": "local"},
                    ],
                },
                "TLSInfo": {"TrustRoot": "", "CertIssuerSubject": "", "CertIssuerPublicKey": ""},
            },
            # Loopback addresses: the simulated node agents answer there (bench/agentsim.py).
            "Status": {"State": "ready", "Addr": f"127.1.{i // 250}.{i % 250 + 1}"},
        }
        if manager:
            node["ManagerStatus"] = {
                "Leader": True,
                "Reachability": "reachable",
                "Addr": f"{node['Status']['Addr']}:2377",
            }
        self.nodes[node_id] = node

    def _add_builtin_networks(self, user_networks: Iterable[str]) -> None:
        now = engine_time()
        specs = [
            ("ingress", "overlay", "swarm", {"Ingress": True}),
            ("bridge", "bridge", "local", {}),
            ("host", "host", "local", {}),
            ("none", "null", "local", {}),
            ("docker_gwbridge", "bridge", "local", {}),
        ] + [(name, "overlay", "swarm", {"Attachable": True}) for name in user_networks]
        for n, (name, driver, scope, extra) in enumerate(specs):
            net_id = swarm_id(f"sim-net-{name}")
            self.networks[net_id] = {
                "Name": name,
                "Id": net_id,
                "Created": now,
                "Scope": scope,
                "Driver": driver,
                "EnableIPv6": False,
                "IPAM": {
                    "Driver": "default",
                    "Options": None,
                    "Config": [{"Subnet": f"10.{n}.0.0/16", "Gateway": f"10.{n}.0.1"}]
                    if driver in ("overlay", "bridge")
                    else [],
                },
                "Internal": False,
                "Attachable": bool(extra.get("Attachable", False)),
                "Ingress": bool(extra.get("Ingress", False)),
                "ConfigFrom": {"Network": ""},
                "ConfigOnly": False,
                "Containers": {},
                "Options": {"com.docker.network.driver.overlay.vxlanid_list": f"{4096 + n}"}
                if driver == "overlay"
                else {},
                "Labels": {},
            }

    # -- state changes (callers hold the lock) ----------------------------------------------

    def _touch(self) -> None:
        self._generation += 1
        self._changed.notify_all()

    def _emit(self, type_: str, action: str, actor_id: str, attributes: dict[str, str]) -> None:
        self._event_seq += 1
        ns = time.time_ns()
        event = SimEvent(self._event_seq, type_, action, actor_id, attributes, ns)
        event.body = (
            json.dumps(
                {
                    "Type": type_,
                    "Action": action,
                    "Actor": {"ID": actor_id, "Attributes": attributes},
                    "scope": "swarm",
                    "time": ns // 1_000_000_000,
                    "timeNano": ns,
                },
                separators=(",", ":"),
            )
            + "\n"
        ).encode()
        self._events.append(event)
        self._changed.notify_all()

    def _network_id(self, target: str) -> str:
        for net_id, net in self.networks.items():
            if target in (net_id, net["Name"]):
                if net["Scope"] != "swarm":
                    raise ApiError(
                        400,
                        f"rpc error: code = InvalidArgument desc = network {target} is not "
                        "a swarm-scoped network",
                    )
                return str(net_id)
        raise ApiError(404, f"network {target} not found")

    def _stored_spec(self, spec: dict[str, Any]) -> dict[str, Any]:
        """The spec as Swarm keeps it: network names resolved to ids, defaults filled in."""
        spec = copy.deepcopy(spec)
        for key in [k for k, v in spec.items() if v is None]:
            del spec[key]
        template = spec.setdefault("TaskTemplate", {})
        if "ContainerSpec" not in template or not template["ContainerSpec"].get("Image"):
            raise ApiError(
                400,
                "rpc error: code = InvalidArgument desc = ContainerSpec: image reference "
                "must be provided",
            )
        template["ContainerSpec"].setdefault("Isolation", "default")
        template.setdefault("ForceUpdate", 0)
        template.setdefault("Runtime", "container")
        for attachment in template.get("Networks") or []:
            attachment["Target"] = self._network_id(attachment.get("Target", ""))
        for reference in template["ContainerSpec"].get("Secrets") or []:
            if reference.get("SecretID") not in self.secrets:
                raise ApiError(
                    400,
                    "rpc error: code = InvalidArgument desc = secret not found: "
                    f"{reference.get('SecretName') or reference.get('SecretID')}",
                )
        spec.setdefault("Labels", {})
        spec.setdefault("Mode", {"Replicated": {"Replicas": 1}})
        spec.setdefault("EndpointSpec", {"Mode": "vip"})
        return spec

    def _endpoint(self, spec: dict[str, Any]) -> dict[str, Any]:
        endpoint_spec = spec.get("EndpointSpec") or {"Mode": "vip"}
        endpoint: dict[str, Any] = {"Spec": endpoint_spec}
        if endpoint_spec.get("Ports"):
            endpoint["Ports"] = [dict(p) for p in endpoint_spec["Ports"]]
        if endpoint_spec.get("Mode", "vip") == "vip":
            attached = spec["TaskTemplate"].get("Networks") or []
            endpoint["VirtualIPs"] = [
                {"NetworkID": a["Target"], "Addr": f"10.0.{n}.2/16"} for n, a in enumerate(attached)
            ]
        return endpoint

    def create_service(self, spec: dict[str, Any], *, running: bool = False) -> str:
        """POST /services/create; running=True skips the start-up delay (pre-seeding)."""
        with self._lock:
            name = spec.get("Name") or ""
            if not name:
                raise ApiError(400, "rpc error: code = InvalidArgument desc = name must be given")
            if any(s["Spec"]["Name"] == name for s in self.services.values()):
                raise ApiError(
                    409,
                    "rpc error: code = AlreadyExists desc = name conflicts with an existing "
                    "object: service " + name + " already exists",
                )
            stored = self._stored_spec(spec)
            service_id = self._new_id("service")
            now = engine_time()
            self.services[service_id] = {
                "ID": service_id,
                "Version": {"Index": self._next_index()},
                "CreatedAt": now,
                "UpdatedAt": now,
                "Spec": stored,
                "Endpoint": self._endpoint(stored),
            }
            self._orchestrate(service_id, immediate=running)
            self._emit("service", "create", service_id, {"name": name})
            self._touch()
            return service_id

    def update_service(self, ref: str, version: int | None, spec: dict[str, Any]) -> None:
        with self._lock:
            service = self._find_service(ref)
            if version is None:
                raise ApiError(400, "invalid service version: version is required")
            if version != service["Version"]["Index"]:
                raise ApiError(500, OUT_OF_SEQUENCE)
            name = spec.get("Name") or service["Spec"]["Name"]
            if name != service["Spec"]["Name"]:
                raise ApiError(
                    500, "rpc error: code = Unimplemented desc = renaming services is not supported"
                )
            stored = self._stored_spec(dict(spec, Name=name))
            old = service["Spec"]
            now = engine_time()
            service["PreviousSpec"] = old
            service["Spec"] = stored
            service["Endpoint"] = self._endpoint(stored)
            service["UpdatedAt"] = now
            service["Version"] = {"Index": self._next_index()}
            if stored["TaskTemplate"] != old["TaskTemplate"]:
                service["UpdateStatus"] = {
                    "State": "updating",
                    "StartedAt": now,
                    "Message": "update in progress",
                }
            self._orchestrate(service["ID"])
            self._emit("service", "update", service["ID"], {"name": name})
            self._touch()

    def remove_service(self, ref: str) -> None:
        with self._lock:
            service = self._find_service(ref)
            del self.services[service["ID"]]
            # Swarm shuts the tasks down and forgets them once their containers are gone.
            for task_id in self._by_service.pop(service["ID"], {}):
                del self.tasks[task_id]
                self._fragments.pop(task_id, None)
            self._fragments.pop(service["ID"], None)
            self._emit("service", "remove", service["ID"], {"name": service["Spec"]["Name"]})
            self._touch()

    def update_node(self, ref: str, version: int | None, spec: dict[str, Any]) -> None:
        with self._lock:
            node = self._find_node(ref)
            if version != node["Version"]["Index"]:
                raise ApiError(500, OUT_OF_SEQUENCE)
            old_availability = node["Spec"]["Availability"]
            node["Spec"] = {
                "Labels": dict(spec.get("Labels") or {}),
                "Role": spec.get("Role") or node["Spec"]["Role"],
                "Availability": spec.get("Availability") or old_availability,
            }
            if "Name" in spec:
                node["Spec"]["Name"] = spec["Name"]
            self._node_changed(node)
            attributes = {"name": node["Description"]["Hostname"]}
            if node["Spec"]["Availability"] != old_availability:
                attributes["availability.new"] = node["Spec"]["Availability"]
                attributes["availability.old"] = old_availability
            self._emit("node", "update", node["ID"], attributes)
            self._touch()

    def create_secret(self, spec: dict[str, Any]) -> str:
        """POST /secrets/create: Name, Labels and Data (base64), kept as given."""
        with self._lock:
            name = spec.get("Name") or ""
            if not name:
                raise ApiError(400, "rpc error: code = InvalidArgument desc = name must be given")
            if any(s["Spec"]["Name"] == name for s in self.secrets.values()):
                raise ApiError(
                    409, f"rpc error: code = AlreadyExists desc = secret {name} already exists"
                )
            try:
                data = base64.b64decode(spec.get("Data") or "", validate=True)
            except ValueError as error:
                raise ApiError(400, f"invalid secret data: {error}") from error
            if not data or len(data) > 500 * 1024:
                raise ApiError(
                    400,
                    "rpc error: code = InvalidArgument desc = secret data must be larger than "
                    "0 and less than 500 KiB",
                )
            secret_id = self._new_id("secret")
            now = engine_time()
            self.secrets[secret_id] = {
                "ID": secret_id,
                "Version": {"Index": self._next_index()},
                "CreatedAt": now,
                "UpdatedAt": now,
                "Spec": {"Name": name, "Labels": dict(spec.get("Labels") or {})},
                "Data": spec["Data"],
            }
            self._touch()
            return secret_id

    def secret_data(self, ref: str) -> bytes:
        """What a task that mounts the secret reads from its file (never served over the
        API: Swarm does not return secret data)."""
        with self._lock:
            return base64.b64decode(self._find_secret(ref)["Data"])

    def remove_secret(self, ref: str) -> None:
        with self._lock:
            secret = self._find_secret(ref)
            users = sorted(
                s["Spec"]["Name"]
                for s in self.services.values()
                if any(
                    r.get("SecretID") == secret["ID"]
                    for r in s["Spec"]["TaskTemplate"]["ContainerSpec"].get("Secrets") or []
                )
            )
            if users:
                raise ApiError(
                    400,
                    f"rpc error: code = InvalidArgument desc = secret '{secret['Spec']['Name']}' "
                    f"is in use by the following service: {', '.join(users)}",
                )
            del self.secrets[secret["ID"]]
            self._touch()

    def set_npu_health(self, ref: str, npu: int, health: str) -> None:
        """What the node's npu-smi reports for one NPU from now on ("OK" clears it)."""
        with self._lock:
            node = self._find_node(ref)
            readings = self.npu_health.setdefault(node["ID"], {})
            if health == "OK":
                readings.pop(npu, None)
                self.npu_fault_at.pop((node["ID"], npu), None)
            else:
                readings[npu] = health
                self.npu_fault_at.setdefault((node["ID"], npu), time.time())
            self.npu_health_version += 1
            self._touch()

    def set_node_state(self, ref: str, state: str) -> None:
        """A node's heartbeat lost (down) or back (ready), as the dispatcher would see it."""
        if state not in ("ready", "down", "unknown", "disconnected"):
            raise ApiError(400, f"unknown node state {state!r}")
        with self._lock:
            node = self._find_node(ref)
            old = node["Status"]["State"]
            if old == state:
                return
            node["Status"]["State"] = state
            node["Status"]["Message"] = "" if state == "ready" else "heartbeat failure"
            self._node_changed(node)
            self._emit(
                "node",
                "update",
                node["ID"],
                {"name": node["Description"]["Hostname"], "state.new": state, "state.old": old},
            )
            self._touch()

    def _node_changed(self, node: dict[str, Any]) -> None:
        node["Version"] = {"Index": self._next_index()}
        node["UpdatedAt"] = engine_time()
        usable = self._usable(node)
        # What a node change can affect: global services (their constraints), services with
        # a task there, and pending tasks (they may fit now). Orchestrating every service for
        # each of a thousand node label writes would be the sim's own quadratic.
        affected = {
            service_id
            for service_id, service in self.services.items()
            if "Global" in (service["Spec"].get("Mode") or {})
        }
        for task in list(self.tasks.values()):
            if task["DesiredState"] == "running" and task["Status"]["State"] == "pending":
                affected.add(task["ServiceID"])
            if task.get("NodeID") != node["ID"]:
                continue
            affected.add(task["ServiceID"])
            if not usable and task["DesiredState"] == "running":
                # The orchestrator replaces the task; the old one keeps its last reported
                # state while its node is unreachable, or stops at once when drained.
                task["DesiredState"] = "shutdown"
                task["Version"] = {"Index": self._next_index()}
                if node["Status"]["State"] == "ready":
                    self._set_task_state(task, "shutdown", "shutdown")
            elif (
                usable
                and task["DesiredState"] == "shutdown"
                and task["Status"]["State"]
                in (
                    "assigned",
                    "running",
                )
            ):
                self._set_task_state(task, "shutdown", "shutdown")
        for service_id in [sid for sid in self.services if sid in affected]:
            self._orchestrate(service_id)

    # -- orchestrator and scheduler (callers hold the lock) ---------------------------------

    def _tasks_of(self, service_id: str) -> list[dict[str, Any]]:
        return list(self._by_service.get(service_id, {}).values())

    @staticmethod
    def _usable(node: dict[str, Any]) -> bool:
        return bool(node["Status"]["State"] == "ready" and node["Spec"]["Availability"] == "active")

    def _set_task_state(
        self, task: dict[str, Any], state: str, message: str, err: str = ""
    ) -> None:
        now = engine_time()
        task["Status"] = {"Timestamp": now, "State": state, "Message": message}
        if err:
            task["Status"]["Err"] = err
        if state == "running":
            task["Status"]["ContainerStatus"] = {
                "ContainerID": hashlib.sha256(task["ID"].encode()).hexdigest(),
                "PID": 1000 + (int(task["ID"][:6], 36) % 60000),
                "ExitCode": 0,
            }
            task["Status"]["PortStatus"] = {}
        task["UpdatedAt"] = now
        task["Version"] = {"Index": self._next_index()}

    def _slots(self, service: dict[str, Any]) -> list[tuple[int, str | None]]:
        """(slot, node id) pairs the service should run: node id None means any node."""
        mode = service["Spec"].get("Mode") or {}
        if "Global" in mode:
            constraints = (service["Spec"]["TaskTemplate"].get("Placement") or {}).get(
                "Constraints"
            ) or []
            return [
                (0, node_id)
                for node_id, node in self.nodes.items()
                if self._usable(node) and node_satisfies(node, constraints)
            ]
        replicas = int((mode.get("Replicated") or {}).get("Replicas", 1))
        return [(slot, None) for slot in range(1, replicas + 1)]

    def _orchestrate(self, service_id: str, immediate: bool = False) -> None:
        """Make the service's tasks match its spec: one live task per slot, of the current
        template; extra and outdated tasks go to shutdown (stop-first)."""
        service = self.services[service_id]
        template = service["Spec"]["TaskTemplate"]
        live = [t for t in self._tasks_of(service_id) if t["DesiredState"] == "running"]
        wanted = self._slots(service)
        wanted_keys = {(slot, node) for slot, node in wanted}
        for task in live:
            key = (task["Slot"], task["NodeID"] if task["Slot"] == 0 else None)
            if key not in wanted_keys or task["Spec"] != template:
                task["DesiredState"] = "shutdown"
                task["Version"] = {"Index": self._next_index()}
                node = self.nodes.get(task.get("NodeID") or "")
                if node is None or node["Status"]["State"] == "ready":
                    self._set_task_state(task, "shutdown", "shutdown")
            else:
                wanted_keys.discard(key)
        for slot, node_id in wanted:
            if (slot, node_id) in wanted_keys:
                self._new_task(service, slot, node_id, immediate)
        self._retry_pending(service_id)
        self._trim_history(service_id)
        self._maybe_complete_update(service)

    def _new_task(
        self, service: dict[str, Any], slot: int, node_id: str | None, immediate: bool
    ) -> None:
        task_id = self._new_id("task")
        now = engine_time()
        template = service["Spec"]["TaskTemplate"]
        task: dict[str, Any] = {
            "ID": task_id,
            "Version": {"Index": self._next_index()},
            "CreatedAt": now,
            "UpdatedAt": now,
            "Labels": {},
            "Spec": copy.deepcopy(template),
            "ServiceID": service["ID"],
            "Slot": slot,
            "Status": {"Timestamp": now, "State": "pending", "Message": "pending task scheduling"},
            "DesiredState": "running",
        }
        if node_id is not None:
            task["NodeID"] = node_id
        self.tasks[task_id] = task
        self._by_service.setdefault(service["ID"], {})[task_id] = task
        self._schedule(task, immediate)

    def _schedule(self, task: dict[str, Any], immediate: bool) -> None:
        constraints = (task["Spec"].get("Placement") or {}).get("Constraints") or []
        pinned = task.get("NodeID") or next(
            (
                c.split("==", 1)[1].strip()
                for c in constraints
                if c.replace(" ", "").startswith("node.id==")
            ),
            None,
        )
        # A node.id constraint names the one node to try, instead of testing a thousand.
        pool = (
            [self.nodes[pinned]] if pinned in self.nodes else [] if pinned else self.nodes.values()
        )
        candidates = [n for n in pool if node_satisfies(n, constraints)]
        usable = [n for n in candidates if self._usable(n)]
        if not usable:
            unavailable = len(candidates)
            reason = (
                f"{unavailable} node not available for new tasks; " if unavailable else ""
            ) + f"scheduling constraints not satisfied on {len(self.nodes) - unavailable} nodes"
            self._set_task_state(
                task, "pending", "pending task scheduling", f"no suitable node ({reason})"
            )
            return
        # Spread like Swarm does: the node with the fewest live tasks.
        load = (
            Counter(t.get("NodeID") for t in self.tasks.values() if t["DesiredState"] == "running")
            if len(usable) > 1
            else Counter()
        )
        node = min(usable, key=lambda n: (load[n["ID"]], n["Description"]["Hostname"]))
        task["NodeID"] = node["ID"]
        task["AssignedGenericResources"] = []
        if immediate or self.task_delay <= 0:
            self._set_task_state(task, "running", "started")
        else:
            self._set_task_state(task, "assigned", "assigned")
            heapq.heappush(
                self._timers,
                (time.monotonic() + self.task_delay, next(self._timer_seq), task["ID"]),
            )
            self._changed.notify_all()

    def _retry_pending(self, service_id: str) -> None:
        for task in self._tasks_of(service_id):
            if task["DesiredState"] == "running" and task["Status"]["State"] == "pending":
                node_id = task.get("NodeID") if task["Slot"] == 0 else None
                if node_id is None:
                    task.pop("NodeID", None)
                self._schedule(task, immediate=False)

    def _trim_history(self, service_id: str) -> None:
        by_slot: dict[tuple[int, str | None], list[dict[str, Any]]] = {}
        for task in self._tasks_of(service_id):
            key = (task["Slot"], task.get("NodeID") if task["Slot"] == 0 else None)
            by_slot.setdefault(key, []).append(task)
        for tasks in by_slot.values():
            old = sorted(
                (t for t in tasks if t["DesiredState"] != "running"), key=lambda t: t["CreatedAt"]
            )
            for task in old[: max(0, len(tasks) - TASK_HISTORY)]:
                del self.tasks[task["ID"]]
                self._fragments.pop(task["ID"], None)
                del self._by_service[service_id][task["ID"]]

    def _maybe_complete_update(self, service: dict[str, Any]) -> None:
        status = service.get("UpdateStatus")
        if not status or status.get("State") != "updating":
            return
        live = [t for t in self._tasks_of(service["ID"]) if t["DesiredState"] == "running"]
        if all(t["Status"]["State"] == "running" for t in live):
            now = engine_time()
            service["UpdateStatus"] = {
                "State": "completed",
                "StartedAt": status["StartedAt"],
                "CompletedAt": now,
                "Message": "update completed",
            }
            # Swarm bumps the version for this too: a client's version read earlier is stale.
            service["Version"] = {"Index": self._next_index()}
            self._emit(
                "service",
                "update",
                service["ID"],
                {
                    "name": service["Spec"]["Name"],
                    "updatestate.new": "completed",
                    "updatestate.old": "updating",
                },
            )

    def _run_timers(self) -> None:
        with self._lock:
            while not self._closing:
                now = time.monotonic()
                changed = False
                while self._timers and self._timers[0][0] <= now:
                    _, _, task_id = heapq.heappop(self._timers)
                    task = self.tasks.get(task_id)
                    if (
                        task is None
                        or task["DesiredState"] != "running"
                        or task["Status"]["State"] != "assigned"
                    ):
                        continue
                    self._set_task_state(task, "running", "started")
                    service = self.services.get(task["ServiceID"])
                    if service is not None:
                        self._maybe_complete_update(service)
                    changed = True
                if changed:
                    self._touch()
                timeout = self._timers[0][0] - now if self._timers else 1.0
                self._changed.wait(timeout=max(0.005, min(timeout, 1.0)))

    # -- look-ups --------------------------------------------------------------------------

    def _find_service(self, ref: str) -> dict[str, Any]:
        if ref in self.services:
            return self.services[ref]
        for service in self.services.values():
            if service["Spec"]["Name"] == ref:
                return service
        matches = [s for sid, s in self.services.items() if sid.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        raise ApiError(404, f"service {ref} not found")

    def _find_task(self, ref: str) -> dict[str, Any]:
        if ref not in self.tasks:
            raise ApiError(404, f"task {ref} not found")
        return self.tasks[ref]

    def _find_secret(self, ref: str) -> dict[str, Any]:
        if ref in self.secrets:
            return self.secrets[ref]
        for secret in self.secrets.values():
            if secret["Spec"]["Name"] == ref:
                return secret
        matches = [s for sid, s in self.secrets.items() if sid.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        raise ApiError(404, f"secret {ref} not found")

    def _list_secrets(self, filters: dict[str, list[str]]) -> list[dict[str, Any]]:
        """Secrets as Swarm lists them: metadata, never the data."""
        result = []
        for secret in self.secrets.values():
            spec = secret["Spec"]
            if "id" in filters and not _any_prefix(secret["ID"], filters["id"]):
                continue
            if "name" in filters and not _any_prefix(spec["Name"], filters["name"]):
                continue
            if "names" in filters and spec["Name"] not in filters["names"]:
                continue
            if "label" in filters and not labels_match(spec.get("Labels"), filters["label"]):
                continue
            result.append(_without_data(secret))
        return result

    def _find_network(self, ref: str) -> dict[str, Any]:
        for net in self.networks.values():
            if ref in (net["Id"], net["Name"]):
                return net
        raise ApiError(404, f"network {ref} not found")

    def dump(self, find: Callable[[], Any]) -> bytes:
        """One object serialized under the lock, so the socket write happens outside it."""
        with self._lock:
            return json.dumps(find(), separators=(",", ":")).encode()

    def _find_node(self, ref: str) -> dict[str, Any]:
        if ref in self.nodes:
            return self.nodes[ref]
        for node in self.nodes.values():
            if node["Description"]["Hostname"] == ref:
                return node
        matches = [n for nid, n in self.nodes.items() if nid.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        raise ApiError(404, f"node {ref} not found")

    def _list_services(
        self, filters: dict[str, list[str]], with_status: bool = False
    ) -> list[dict[str, Any]]:
        """``with_status``: API 1.41's task counts per service (``?status=true``)."""
        result = []
        for service in self.services.values():
            spec = service["Spec"]
            if "id" in filters and not _any_prefix(service["ID"], filters["id"]):
                continue
            if "name" in filters and not _any_prefix(spec["Name"], filters["name"]):
                continue
            if "label" in filters and not labels_match(spec.get("Labels"), filters["label"]):
                continue
            if "mode" in filters:
                mode = "global" if "Global" in spec.get("Mode", {}) else "replicated"
                if mode not in filters["mode"]:
                    continue
            result.append(self._with_status(service) if with_status else service)
        return result

    def _with_status(self, service: dict[str, Any]) -> dict[str, Any]:
        live = [t for t in self._tasks_of(service["ID"]) if t["DesiredState"] == "running"]
        running = sum(1 for t in live if t["Status"]["State"] == "running")
        counts = {"RunningTasks": running, "DesiredTasks": len(live), "CompletedTasks": 0}
        return dict(service, ServiceStatus=counts)

    def _list_tasks(self, filters: dict[str, list[str]]) -> list[dict[str, Any]]:
        service_ids = (
            {self._find_service(ref)["ID"] for ref in filters["service"]}
            if "service" in filters
            else None
        )
        node_ids = (
            {self._find_node(ref)["ID"] for ref in filters["node"]} if "node" in filters else None
        )
        result = []
        for task in self.tasks.values():
            if service_ids is not None and task["ServiceID"] not in service_ids:
                continue
            if node_ids is not None and task.get("NodeID") not in node_ids:
                continue
            if "id" in filters and not _any_prefix(task["ID"], filters["id"]):
                continue
            if "desired-state" in filters and task["DesiredState"] not in filters["desired-state"]:
                continue
            if "label" in filters and not labels_match(task.get("Labels"), filters["label"]):
                continue
            if "name" in filters:
                service = self.services.get(task["ServiceID"])
                prefix = service["Spec"]["Name"] if service else ""
                name = f"{prefix}.{task['Slot'] or task.get('NodeID')}"
                if not _any_prefix(name, filters["name"]):
                    continue
            result.append(task)
        return result

    def _list_nodes(self, filters: dict[str, list[str]]) -> list[dict[str, Any]]:
        result = []
        for node in self.nodes.values():
            if "id" in filters and not _any_prefix(node["ID"], filters["id"]):
                continue
            if "name" in filters and not _any_prefix(
                node["Description"]["Hostname"], filters["name"]
            ):
                continue
            if "role" in filters and node["Spec"]["Role"] not in filters["role"]:
                continue
            if "membership" in filters and "accepted" not in filters["membership"]:
                continue
            if "node.label" in filters and not labels_match(
                node["Spec"].get("Labels"), filters["node.label"]
            ):
                continue
            result.append(node)
        return result

    def _list_networks(self, filters: dict[str, list[str]]) -> list[dict[str, Any]]:
        result = []
        for net in self.networks.values():
            if "name" in filters and not any(n in net["Name"] for n in filters["name"]):
                continue
            if "id" in filters and not _any_prefix(net["Id"], filters["id"]):
                continue
            if "driver" in filters and net["Driver"] not in filters["driver"]:
                continue
            if "scope" in filters and net["Scope"] not in filters["scope"]:
                continue
            result.append(net)
        return result

    def cached_list(
        self, route: str, query: str, build: Callable[[], Any], per_object: bool = True
    ) -> bytes:
        """The serialized answer, reused until the state changes. After a change only the
        objects whose Version moved are serialized again (``per_object``; off for answers
        that add fields to the stored objects)."""
        key = f"{route}?{query}"
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit.generation == self._generation:
                return hit.body
            items = build()
            if per_object:
                body = b"[" + b",".join(self._fragment(item) for item in items) + b"]"
            else:
                body = json.dumps(items, separators=(",", ":")).encode()
            if len(self._cache) > 256:
                self._cache.clear()
            self._cache[key] = _Cached(self._generation, body)
            return body

    def _fragment(self, obj: dict[str, Any]) -> bytes:
        """One object's JSON, kept while its Version.Index stays (every change bumps it)."""
        key = obj.get("ID") or obj["Id"]
        version = (obj.get("Version") or {}).get("Index", 0)
        hit = self._fragments.get(key)
        if hit is not None and hit[0] == version:
            return hit[1]
        data = json.dumps(obj, separators=(",", ":")).encode()
        self._fragments[key] = (version, data)
        return data

    # -- benchmark controls ------------------------------------------------------------------

    def count(self, route: str, sent: int, status: int = 200) -> None:
        with self._lock:
            self.counters.requests[route] += 1
            self.counters.bytes_sent[route] += sent
            if status >= 400:
                self.counters.errors[route] += 1

    def stats(self) -> dict[str, Any]:
        with self._lock:
            requests = dict(self.counters.requests)
            return {
                "since": self.counters.since,
                "now": time.time(),
                "requests": requests,
                "bytes": dict(self.counters.bytes_sent),
                "errors": dict(self.counters.errors),
                "list_calls": sum(requests.get(r, 0) for r in LIST_ROUTES),
                "writes": sum(n for r, n in requests.items() if r.split()[0] in WRITE_METHODS),
                "nodes": len(self.nodes),
                "services": len(self.services),
                "tasks": len(self.tasks),
                "secrets": len(self.secrets),
                "agents": self.agents.stats() if self.agents is not None else None,
                "running_tasks": sum(
                    1
                    for t in self.tasks.values()
                    if t["Status"]["State"] == "running" and t["DesiredState"] == "running"
                ),
            }

    def reset_counters(self) -> None:
        with self._lock:
            self.counters = Counters()

    def summary(self) -> list[dict[str, Any]]:
        """One line per service; Node and Npus: where its last running task runs, and the
        ASCEND_VISIBLE_DEVICES that task was given."""
        with self._lock:
            running: Counter[str] = Counter()
            where: dict[str, tuple[str, str]] = {}
            for t in self.tasks.values():
                if t["Status"]["State"] == "running" and t["DesiredState"] == "running":
                    running[t["ServiceID"]] += 1
                    env = t["Spec"]["ContainerSpec"].get("Env") or []
                    npus = next(
                        (
                            e.split("=", 1)[1]
                            for e in env
                            if e.startswith("ASCEND_VISIBLE_DEVICES=")
                        ),
                        "",
                    )
                    where[t["ServiceID"]] = (t.get("NodeID", ""), npus)
            return [
                {
                    "ID": s["ID"],
                    "Name": s["Spec"]["Name"],
                    "Labels": s["Spec"].get("Labels") or {},
                    "Version": s["Version"]["Index"],
                    "Image": s["Spec"]["TaskTemplate"]["ContainerSpec"].get("Image"),
                    "CreatedAt": s["CreatedAt"],
                    "Running": running[s["ID"]],
                    "Node": where.get(s["ID"], ("", ""))[0],
                    "Npus": where.get(s["ID"], ("", ""))[1],
                }
                for s in self.services.values()
            ]

    def seed(
        self, count: int, prefix: str = "seed", labels: dict[str, str] | None = None
    ) -> list[str]:
        """``count`` running one-replica services spread over the nodes, one NPU each."""
        with self._lock:
            node_ids = sorted(self.nodes, key=lambda n: self.nodes[n]["Description"]["Hostname"])
            start = len(self.services)
            ids = []
            for i in range(count):
                node_id = node_ids[i % len(node_ids)]
                npu = (i // len(node_ids)) % 8
                spec = {
                    "Name": f"{prefix}-{start + i}",
                    "Labels": dict(labels or {}),
                    "TaskTemplate": {
                        "ContainerSpec": {
                            "Image": "sim/seed:latest",
                            "Env": [f"ASCEND_VISIBLE_DEVICES={npu}"],
                            "Labels": dict(labels or {}),
                        },
                        "Placement": {"Constraints": [f"node.id=={node_id}"]},
                    },
                    "Mode": {"Replicated": {"Replicas": 1}},
                }
                ids.append(self.create_service(spec, running=True))
            return ids

    # -- server ------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, host: str = "127.0.0.1", port: int = 0) -> EngineSim:
        handler = type("Handler", (_Handler,), {"sim": self})
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        for target, name in (
            (self._serve_http, "enginesim-http"),
            (self._run_timers, "enginesim-timers"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def start_agents(self, port: int, host: str = "0.0.0.0") -> Any:
        """Serve the node agents on ``port`` (bench/agentsim.py; needs npuswarm importable)."""
        from agentsim import AgentSim

        self.agents = AgentSim(self, port, host).start()
        return self.agents

    def _serve_http(self) -> None:
        assert self._server is not None
        self._server.serve_forever(poll_interval=0.05)

    def stop(self) -> None:
        with self._lock:
            self._closing = True
            self._changed.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self.agents is not None:
            self.agents.stop()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> EngineSim:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stream_events(
        self,
        write: Callable[[bytes], None],
        since: float | None,
        until: float | None,
        filters: dict[str, list[str]],
    ) -> None:
        """Write matching events until the client leaves, ``until`` passes or the server stops."""
        with self._lock:
            if since is not None:
                backlog = [e for e in self._events if e.time_ns >= since * 1e9]
                cursor = self._event_seq
            else:
                backlog, cursor = [], self._event_seq
        for event in backlog:
            if _event_matches(event, filters, self):
                write(event.body)
        while True:
            with self._lock:
                while self._event_seq == cursor and not self._closing:
                    if until is not None and time.time() >= until:
                        return
                    self._changed.wait(timeout=0.5)
                if self._closing:
                    return
                fresh = [e for e in self._events if e.seq > cursor]
                cursor = self._event_seq
            for event in fresh:
                if until is not None and event.time_ns > until * 1e9:
                    return
                if _event_matches(event, filters, self):
                    write(event.body)


def _without_data(secret: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in secret.items() if k != "Data"}


def _event_matches(event: SimEvent, filters: dict[str, list[str]], sim: EngineSim) -> bool:
    if "type" in filters and event.type not in filters["type"]:
        return False
    if "event" in filters and event.action not in filters["event"]:
        return False
    if "scope" in filters and "swarm" not in filters["scope"]:
        return False
    name = event.attributes.get("name", "")
    for kind in ("service", "node"):
        if kind in filters and (
            event.type != kind or not {event.actor_id, name} & set(filters[kind])
        ):
            return False
    return True


# --- HTTP ----------------------------------------------------------------------------------

_VERSION_PREFIX = re.compile(r"^/v1\.\d+(?=/)")
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (method, re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$"), pattern)
    for method, pattern in [
        ("GET", "/_ping"),
        ("HEAD", "/_ping"),
        ("GET", "/version"),
        ("GET", "/info"),
        ("GET", "/events"),
        ("GET", "/nodes"),
        ("GET", "/nodes/{id}"),
        ("POST", "/nodes/{id}/update"),
        ("GET", "/services"),
        ("POST", "/services/create"),
        ("GET", "/services/{id}"),
        ("POST", "/services/{id}/update"),
        ("DELETE", "/services/{id}"),
        ("GET", "/tasks"),
        ("GET", "/tasks/{id}"),
        ("GET", "/networks"),
        ("GET", "/networks/{id}"),
        ("GET", "/secrets"),
        ("POST", "/secrets/create"),
        ("GET", "/secrets/{id}"),
        ("DELETE", "/secrets/{id}"),
        ("GET", "/sim/stats"),
        ("POST", "/sim/reset"),
        ("GET", "/sim/services"),
        ("POST", "/sim/nodes/{id}/{state}"),
        ("POST", "/sim/nodes/{id}/npus/{npu}/health"),
        ("POST", "/sim/seed"),
        ("DELETE", "/sim/services/{id}"),
    ]
]


class _Handler(BaseHTTPRequestHandler):
    sim: EngineSim
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: with Nagle's algorithm each answer would
    # wait for the client's delayed ACK (40 ms), which would swamp every timing.
    disable_nagle_algorithm = True
    server_version = f"Docker/{ENGINE_VERSION} (linux)"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        path = _VERSION_PREFIX.sub("", unquote(split.path))
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw_body = self.rfile.read(length) if length else b""
        for route_method, pattern, template in _ROUTES:
            match = pattern.match(path)
            if match and route_method == method:
                route = f"{method} {template}"
                try:
                    self._serve(route, match.groupdict(), query, split.query, raw_body)
                except ApiError as error:
                    self._reply(route, error.status, {"message": error.message})
                except (BrokenPipeError, ConnectionResetError):
                    return
                return
        self._reply(f"{method} ?", 404, {"message": "page not found"})

    def _reply(
        self, route: str, status: int, body: Any, content_type: str = "application/json"
    ) -> None:
        if isinstance(body, bytes):
            data = body
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = (json.dumps(body, separators=(",", ":")) + "\n").encode()
        self.send_response(status)
        self.send_header("Api-Version", API_VERSION)
        self.send_header("Docker-Experimental", "false")
        self.send_header("Ostype", "linux")
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        # Counted before the client can read the answer: a counter read right after a
        # call returns must include it.
        if not route.startswith(("GET /sim", "POST /sim", "DELETE /sim")):
            self.sim.count(route, len(data), status)
        if self.command != "HEAD":
            self.wfile.write(data)

    def _body(self, raw: bytes) -> dict[str, Any]:
        if not raw:
            return {}
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as error:
            raise ApiError(400, f"invalid JSON: {error}") from error
        if not isinstance(data, dict):
            raise ApiError(400, "invalid JSON: not an object")
        return data

    def _serve(
        self,
        route: str,
        params: dict[str, str],
        query: dict[str, str],
        raw_query: str,
        raw_body: bytes,
    ) -> None:
        sim = self.sim
        filters = parse_filters(query.get("filters"))
        key = "&".join(sorted(raw_query.split("&")))
        if route in ("GET /_ping", "HEAD /_ping"):
            self._reply(route, 200, "OK", "text/plain; charset=utf-8")
        elif route == "GET /version":
            self._reply(route, 200, _version())
        elif route == "GET /info":
            self._reply(route, 200, _info(sim))
        elif route == "GET /events":
            self._events(route, query, filters)
        elif route == "GET /nodes":
            self._reply(route, 200, sim.cached_list(route, key, lambda: sim._list_nodes(filters)))
        elif route == "GET /nodes/{id}":
            self._reply(route, 200, sim.dump(lambda: sim._find_node(params["id"])))
        elif route == "POST /nodes/{id}/update":
            sim.update_node(params["id"], _version_param(query), self._body(raw_body))
            self._reply(route, 200, b"", "text/plain")
        elif route == "GET /services":
            with_status = query.get("status", "").lower() in ("1", "true")
            body = sim.cached_list(
                route, key, lambda: sim._list_services(filters, with_status), not with_status
            )
            self._reply(route, 200, body)
        elif route == "POST /services/create":
            service_id = sim.create_service(self._body(raw_body))
            self._reply(route, 201, {"ID": service_id})
        elif route == "GET /services/{id}":
            self._reply(route, 200, sim.dump(lambda: sim._find_service(params["id"])))
        elif route == "POST /services/{id}/update":
            sim.update_service(params["id"], _version_param(query), self._body(raw_body))
            self._reply(route, 200, {})
        elif route == "DELETE /services/{id}":
            sim.remove_service(params["id"])
            self._reply(route, 200, b"", "text/plain")
        elif route == "GET /tasks":
            with sim._lock:  # a bad service/node filter must raise before caching
                body = sim.cached_list(route, key, lambda: sim._list_tasks(filters))
            self._reply(route, 200, body)
        elif route == "GET /tasks/{id}":
            self._reply(route, 200, sim.dump(lambda: sim._find_task(params["id"])))
        elif route == "GET /networks":
            self._reply(
                route, 200, sim.cached_list(route, key, lambda: sim._list_networks(filters))
            )
        elif route == "GET /networks/{id}":
            self._reply(route, 200, sim.dump(lambda: sim._find_network(params["id"])))
        elif route == "GET /secrets":
            self._reply(route, 200, sim.cached_list(route, key, lambda: sim._list_secrets(filters)))
        elif route == "POST /secrets/create":
            self._reply(route, 201, {"ID": sim.create_secret(self._body(raw_body))})
        elif route == "GET /secrets/{id}":
            self._reply(route, 200, sim.dump(lambda: _without_data(sim._find_secret(params["id"]))))
        elif route == "DELETE /secrets/{id}":
            sim.remove_secret(params["id"])
            self._reply(route, 204, b"", "text/plain")
        elif route == "GET /sim/stats":
            self._reply(route, 200, sim.stats())
        elif route == "POST /sim/reset":
            sim.reset_counters()
            self._reply(route, 200, {})
        elif route == "GET /sim/services":
            # Polled by benchmarks while the operator works: cached like the lists.
            self._reply(route, 200, sim.cached_list(route, "", sim.summary, per_object=False))
        elif route == "POST /sim/nodes/{id}/{state}":
            state = {"down": "down", "up": "ready", "ready": "ready"}.get(params["state"])
            if state is None:
                raise ApiError(404, f"no such node action {params['state']!r}: use down or up")
            sim.set_node_state(params["id"], state)
            self._reply(route, 200, {})
        elif route == "POST /sim/nodes/{id}/npus/{npu}/health":
            health = query.get("state", "")
            if not re.fullmatch(r"[A-Za-z]{1,20}", health):
                raise ApiError(400, "state: a health as npu-smi prints it (OK, Warning, Critical)")
            if not params["npu"].isdigit():
                raise ApiError(400, f"not an NPU id: {params['npu']!r}")
            sim.set_npu_health(params["id"], int(params["npu"]), health)
            self._reply(route, 200, {})
        elif route == "POST /sim/seed":
            seed_labels = self._body(raw_body).get("Labels")
            ids = sim.seed(int(query.get("count", "0")), query.get("prefix", "seed"), seed_labels)
            self._reply(route, 200, {"IDs": ids})
        elif route == "DELETE /sim/services/{id}":
            sim.remove_service(params["id"])
            self._reply(route, 200, {})

    def _events(self, route: str, query: dict[str, str], filters: dict[str, list[str]]) -> None:
        since = float(query["since"]) if query.get("since") else None
        until = float(query["until"]) if query.get("until") else None
        self.send_response(200)
        self.send_header("Api-Version", API_VERSION)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        self.sim.count(route, 0)

        def write(data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        try:
            self.sim.stream_events(write, since, until, filters)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        self.close_connection = True


def _version_param(query: dict[str, str]) -> int | None:
    try:
        return int(query["version"]) if "version" in query else None
    except ValueError as error:
        raise ApiError(400, f"invalid service version {query['version']!r}") from error


def _version() -> dict[str, Any]:
    return {
        "Platform": {"Name": "Docker Engine - Community"},
        "Components": [
            {
                "Name": "Engine",
                "Version": ENGINE_VERSION,
                "Details": {"ApiVersion": API_VERSION, "MinAPIVersion": "1.12", "Os": "linux"},
            }
        ],
        "Version": ENGINE_VERSION,
        "ApiVersion": API_VERSION,
        "MinAPIVersion": "1.12",
        "GitCommit": "a89b842",
        "GoVersion": "go1.18.10",
        "Os": "linux",
        "Arch": "amd64",
        "KernelVersion": "enginesim",
        "BuildTime": "2023-04-14T10:32:03.000000000+00:00",
    }


def _info(sim: EngineSim) -> dict[str, Any]:
    with sim._lock:
        manager = next(n for n in sim.nodes.values() if n["Spec"]["Role"] == "manager")
        return {
            "ID": swarm_id("sim-engine"),
            "Containers": 0,
            "Images": 0,
            "Name": manager["Description"]["Hostname"],
            "ServerVersion": ENGINE_VERSION,
            "OperatingSystem": "enginesim",
            "OSType": "linux",
            "Architecture": "x86_64",
            "NCPU": 2,
            "MemTotal": 0,
            "Swarm": {
                "NodeID": manager["ID"],
                "NodeAddr": manager["Status"]["Addr"],
                "LocalNodeState": "active",
                "ControlAvailable": True,
                "Error": "",
                "RemoteManagers": [
                    {"NodeID": manager["ID"], "Addr": f"{manager['Status']['Addr']}:2377"}
                ],
                "Nodes": len(sim.nodes),
                "Managers": 1,
                "Cluster": {
                    "ID": sim.cluster_id,
                    "Version": {"Index": 10},
                    "CreatedAt": manager["CreatedAt"],
                    "UpdatedAt": manager["CreatedAt"],
                    "Spec": {
                        "Name": "default",
                        "Orchestration": {"TaskHistoryRetentionLimit": TASK_HISTORY},
                        "Dispatcher": {"HeartbeatPeriod": 5_000_000_000},
                    },
                },
            },
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--npus", type=int, default=8, help="NPUs per node")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--task-delay", type=float, default=0.5, help="seconds until running")
    parser.add_argument("--network", action="append", default=None, help="overlay networks")
    parser.add_argument("--seed", type=int, default=0, help="pre-seed this many services")
    parser.add_argument(
        "--agent-port",
        type=int,
        default=0,
        help="serve the node agents on this port of every node address (bench/agentsim.py)",
    )
    args = parser.parse_args(argv)
    sim = EngineSim(
        nodes=args.nodes,
        npus_per_node=args.npus,
        task_delay=args.task_delay,
        networks=args.network or ["vllm-net"],
    )
    if args.seed:
        sim.seed(args.seed)
    sim.start(args.host, args.port)
    print(f"enginesim: {args.nodes} nodes on {sim.url}", flush=True)
    if args.agent_port:
        sim.start_agents(args.agent_port)
        print(f"enginesim: node agents on port {args.agent_port}", flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    stopped.wait()
    sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
