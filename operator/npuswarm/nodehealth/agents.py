"""The node agents: one global Swarm service per distinct NPU set of the fleet, their secrets,
the node label that places them, and what their answers mean. Pure (docs/node-health.md).

NPUs reach a task only through Ascend Docker Runtime reading ``ASCEND_VISIBLE_DEVICES``
(explicit ids), and npu-smi is mounted only into containers that ask for NPUs, so an agent
asks for all its node's NPUs. One service spec gives every task the same env: nodes with the
same NPU set share one global service, constrained to them by the node label
``io.npuswarm.agent-npus`` (the only node label npuswarm writes; no slash: Swarm refuses
one in a constraint's key). A node joining or changing
needs only its label; no other agent restarts.

The agent holds no NPU: its service carries ``npuswarm.io/node-agent``, which observe skips
(core/snapshot.py), and never npuswarm's managed-by label. Its credential and TLS key
(gateway/credentials.py, AgentIdentity) come as Swarm secrets, the same for every agent.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from npuswarm.api import labels
from npuswarm.core.clock import SECOND_NS
from npuswarm.core.nodes import NodeInfo
from npuswarm.core.npus import format_npu_ids, parse_npu_ids
from npuswarm.core.snapshot import ObservedSecret
from npuswarm.gateway.credentials import AgentIdentity, Credentials
from npuswarm.gateway.service import NewSecret, SecretMount, new_tls_secret, valid_tls
from npuswarm.nodehealth import checks, faults
from npuswarm.nodehealth.checks import Verdict
from npuswarm.nodehealth.npusmi import NodeHealth, NpuReading, parse_npu_smi

AGENT = labels.NODE_AGENT  # value: the installation
AGENT_SET = labels.NODE_AGENT_SET
NODE_LABEL = labels.NODE_AGENT_NPUS
NAME_PREFIX = "npuswarm-agent"
# Where Swarm mounts the agent's secrets (tmpfs), and what the agent answers on.
CREDENTIAL_FILE = "npuswarm-agent-credential"
TLS_FILE = "npuswarm-agent-tls.pem"
STATE_PATH = "/v1/state"
# npu-exporter's path: the node's NPU metrics, unsigned (nodehealth/agent.py).
METRICS_PATH = "/metrics"
# The node's name, from Swarm's template: the metrics' ``node`` label, as the operator names it.
NODE_ENV = "NPUSWARM_NODE"
# Where the agent sees the node's filesystem, read-only (nodehealth/pathcheck.py reads only
# below the allowed host-path roots). The whole of "/" rather than each root at its own
# path: Docker 20.10 refuses to start a task whose bind source is missing, so a root absent
# from one node would keep that node's agent from starting.
HOST_VIEW = "/host"
CREDENTIAL_KIND, TLS_KIND = "agent-credential", "agent-tls"
IDENTITY = AgentIdentity()


def set_label(npus: Iterable[int]) -> str:
    """A node's NPU set as a node label value a placement constraint can match: ranges joined
    by ``_`` (``0-7``, ``0-3_6``); Swarm refuses a comma in a constraint's value."""
    ids = sorted(set(npus))
    parts: list[str] = []
    start = previous = None
    for npu in [*ids, None]:
        if npu is not None and previous is not None and npu == previous + 1:
            previous = npu
            continue
        if start is not None:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = npu
    return "_".join(parts)


def parse_set_label(value: str) -> frozenset[int]:
    return parse_npu_ids(value.replace("_", ","))


def agent_nodes(nodes: Iterable[NodeInfo]) -> list[NodeInfo]:
    """The nodes that get an agent: those with NPUs."""
    return [node for node in nodes if node.npus]


def label_writes(nodes: Iterable[NodeInfo]) -> dict[str, str]:
    """Node id -> the NPU-set label it must carry, for the nodes whose label is not that."""
    return {
        node.id: set_label(node.npus)
        for node in agent_nodes(nodes)
        if node.labels.get(NODE_LABEL) != set_label(node.npus)
    }


def wanted_sets(nodes: Iterable[NodeInfo]) -> list[str]:
    """The distinct NPU sets of the fleet: one agent service each."""
    return sorted({set_label(node.npus) for node in agent_nodes(nodes)})


def service_name(instance: str, npu_set: str) -> str:
    name = f"{NAME_PREFIX}-{instance}-{npu_set}"
    if len(name) <= 63:
        return name
    return f"{name[:54]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def agent_spec(
    npu_set: str,
    image: str,
    instance: str,
    port: int,
    interval_seconds: float,
    mounts: Sequence[SecretMount],
    recheck_failed_seconds: float = 60.0,
    host_roots: Sequence[str] = (),
) -> dict[str, Any]:
    """One NPU set's agent: a global service on the nodes labelled with that set, asking for
    its NPUs as a replica does, its port published on each node's address (host mode: the
    operator reads each node's own agent, and the routing mesh would hide which node
    answered)."""
    npus = parse_set_label(npu_set)
    service_labels = {AGENT: instance, AGENT_SET: npu_set}
    rendered: dict[str, Any] = {
        "Name": service_name(instance, npu_set),
        "Labels": dict(service_labels),
        "TaskTemplate": {
            "ContainerSpec": {
                "Image": image,
                "Command": ["npuswarm", "agent"],
                "Args": [
                    "--port",
                    str(port),
                    "--interval",
                    f"{interval_seconds:g}",
                    "--recheck-failed",
                    f"{recheck_failed_seconds:g}",
                    # What was asked, apart from the env the runtime may have rewritten: the
                    # `env` check compares the two.
                    "--npus",
                    format_npu_ids(npus),
                    *(["--host-roots", ",".join(host_roots)] if host_roots else []),
                ],
                # npu-smi opens the driver's devices, root:HwHiAiUser 0660 on Atlas nodes.
                "User": "0",
                "Env": [
                    f"ASCEND_VISIBLE_DEVICES={format_npu_ids(npus)}",
                    f"{NODE_ENV}={{{{.Node.Hostname}}}}",
                ],
                "Secrets": [
                    {
                        "File": {"Name": mount.file, "UID": "0", "GID": "0", "Mode": 0o400},
                        "SecretID": mount.secret_id,
                        "SecretName": mount.name,
                    }
                    for mount in mounts
                ],
                "Labels": dict(service_labels),
                "Init": True,
                # The node's filesystem, read-only, for the host-path checks. Docker's default
                # propagation (rprivate): rslave would be refused on a node whose / is a
                # private mount ("not a shared or slave mount"), and keep its agent down.
                "Mounts": [{"Type": "bind", "Source": "/", "Target": HOST_VIEW, "ReadOnly": True}]
                if host_roots
                else [],
            },
            "Placement": {"Constraints": [f"node.labels.{NODE_LABEL}=={npu_set}"]},
            "Resources": {"Limits": {"MemoryBytes": 256 * 1024 * 1024}},
            "RestartPolicy": {"Condition": "any", "Delay": 2 * SECOND_NS, "MaxAttempts": 0},
        },
        "Mode": {"Global": {}},
        # A host port leaves no room for a new task beside the old one on its node.
        "UpdateConfig": {"Parallelism": 0, "Order": "stop-first", "FailureAction": "continue"},
        "EndpointSpec": {
            "Mode": "dnsrr",
            "Ports": [
                {
                    "Protocol": "tcp",
                    "TargetPort": port,
                    "PublishedPort": port,
                    "PublishMode": "host",
                }
            ],
        },
    }
    digest = hashlib.sha256(json.dumps(rendered, sort_keys=True).encode()).hexdigest()[:16]
    rendered["Labels"][labels.SPEC_HASH] = digest
    return rendered


@dataclass(frozen=True)
class AgentWrite:
    """One write to an agent service: create (no id), update, or remove (no spec)."""

    kind: str
    name: str
    service_id: str = ""
    version: int = 0
    spec: dict[str, Any] = field(default_factory=dict)


def agent_writes(
    wanted: Mapping[str, dict[str, Any]], observed: Sequence[Mapping[str, Any]]
) -> list[AgentWrite]:
    """``wanted``: NPU set -> rendered spec; ``observed``: this installation's agent services
    (Engine JSON). Creates what is missing, updates what differs, removes the rest."""
    writes: list[AgentWrite] = []
    seen: set[str] = set()
    for service in sorted(observed, key=lambda s: str(s.get("ID", ""))):
        spec = service.get("Spec") or {}
        npu_set = (spec.get("Labels") or {}).get(AGENT_SET, "")
        service_id = str(service.get("ID", ""))
        name = str(spec.get("Name", ""))
        if npu_set not in wanted or npu_set in seen:
            writes.append(AgentWrite("remove", name, service_id))
            continue
        seen.add(npu_set)
        want = wanted[npu_set]
        if (spec.get("Labels") or {}).get(labels.SPEC_HASH) != want["Labels"][labels.SPEC_HASH]:
            version = int((service.get("Version") or {}).get("Index", 0))
            writes.append(AgentWrite("update", name, service_id, version, dict(want, Name=name)))
    writes += [
        AgentWrite("create", spec["Name"], spec=spec)
        for npu_set, spec in sorted(wanted.items())
        if npu_set not in seen
    ]
    return writes


@dataclass
class AgentSecrets:
    """Secrets to create before the agents' services are written, what they mount (by name),
    and the agents' secrets nothing will mount any more."""

    create: list[NewSecret] = field(default_factory=list)
    mounts: tuple[SecretMount, ...] = ()
    stale: list[ObservedSecret] = field(default_factory=list)


def plan_secrets(
    observed: Sequence[ObservedSecret], credentials: Credentials, instance: str, now: datetime
) -> AgentSecrets:
    """The agents' credential and a TLS certificate valid beyond the renewal margin: found, or
    made now (Swarm secrets are immutable: a new one gets a new name)."""
    plan = AgentSecrets()
    credential_id = credentials.credential_id(IDENTITY)
    base = {AGENT: instance, labels.CREDENTIAL_ID: credential_id}
    prefix = f"{NAME_PREFIX}-{instance}"[:40]
    credential_name = f"{prefix}-{credential_id}-key"
    if not any(s.name == credential_name for s in observed):
        plan.create.append(
            NewSecret(
                credential_name,
                credentials.credential_file(IDENTITY),
                base | {labels.SECRET_KIND: CREDENTIAL_KIND},
            )
        )
    tls_name = valid_tls(observed, credential_id, now, TLS_KIND)
    if tls_name is None:
        fresh = new_tls_secret(credentials, IDENTITY, credential_id, prefix, base, now, TLS_KIND)
        tls_name = fresh.name
        plan.create.append(fresh)
    plan.mounts = (
        SecretMount(credential_name, CREDENTIAL_FILE),
        SecretMount(tls_name, TLS_FILE),
    )
    plan.stale = [s for s in observed if s.name not in {credential_name, tls_name}]
    return plan


# --- what an agent answers ------------------------------------------------------------------


def verdict(node: NodeInfo, answer: Mapping[str, Any], now: datetime) -> Verdict:
    """The agent's own container, checked at its start and on every reading, judged with the
    checks and messages of the validation probes it replaces (nodehealth/checks.py)."""
    found = answer.get("validation") or {}
    try:
        npus = parse_npu_ids(str(found.get("npus", "")))
    except ValueError:
        npus = frozenset()
    return checks.judge(node, npus or node.npus, found or None, now)


def health(
    node: NodeInfo,
    answer: Mapping[str, Any],
    now: datetime,
    table: faults.FaultTable | None = None,
) -> NodeHealth:
    """The agent's last `npu-smi info`, each NPU's error codes graded with ``table``: no
    table is no reading (nothing is concluded)."""
    reading = answer.get("npuSmi") or {}
    readings = npu_readings(answer, table)
    error = "" if readings else f"no npu-smi table ({reading.get('error') or 'empty output'})"
    since = {
        int(npu): datetime.fromtimestamp(float(at), UTC)
        for npu, at in (answer.get("npuSince") or {}).items()
        if str(npu).isdigit() and isinstance(at, int | float)
    }
    return NodeHealth(node.id, node.hostname or node.id, now, readings, error, since)


def npu_readings(
    answer: Mapping[str, Any], table: faults.FaultTable | None = None
) -> dict[int, NpuReading]:
    """Per NPU of the agent's answer: its `npu-smi info` row, with its error codes graded
    with ``table`` (the default grades when None)."""
    readings = parse_npu_smi(str((answer.get("npuSmi") or {}).get("text", "")))
    texts = answer.get("npuFaults") or {}
    grades = table or faults.FaultTable.default()
    for npu, found in list(readings.items()):
        codes = faults.error_codes(str(texts.get(str(npu), "")))
        fault = faults.grade(found.health, codes, grades)
        if fault is not None:
            readings[npu] = replace(found, fault=fault)
    return readings


def unreachable(node: NodeInfo, why: str, now: datetime) -> NodeHealth:
    """A node whose agent did not answer: its health is unknown, so nothing moves for it."""
    return NodeHealth(node.id, node.hostname or node.id, now, {}, f"agent unreachable: {why}")
