"""Node validation: does a node's Ascend Docker Runtime really give NPUs to containers? Pure.

The node agent (nodehealth/agent.py) runs in a container that asks for its node's NPUs exactly
as a replica does (``ASCEND_VISIBLE_DEVICES`` in its env) and looks for what the runtime must
deliver: the ``/dev/davinciN`` nodes, the driver's management devices and the driver files of
the runtime's mount list. These functions name those paths, turn what it found into checks a
person can act on, and say which nodes take no new replicas. (The ``probe`` labels are those
of the one-shot probe services of earlier versions, removed at startup.)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from npuswarm.api import labels
from npuswarm.core.nodes import NodeInfo
from npuswarm.core.npus import format_npu_ids, parse_npu_ids

# The validation probe services of earlier versions carry this label (value: the
# installation); the operator removes them at startup.
CHECK = f"{labels.PREFIX}/node-probe"
# What Ascend Docker Runtime mounts besides the NPUs (its base.list): the driver's
# management devices and the driver files vllm-ascend needs.
CONTROL_DEVICES = ("/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc")
DRIVER_FILES = ("/usr/local/Ascend/driver/lib64", "/usr/local/dcmi", "/usr/local/bin/npu-smi")
# Check names: the `check` label of npuswarm_node_validation; bounded.
RUNTIME = "runtime"
DEVICES = "npu-devices"
CONTROL = "control-devices"
DRIVER = "driver-files"
ENV = "env"
AGENT = "agent"
CHECKS = (RUNTIME, DEVICES, CONTROL, DRIVER, ENV, AGENT)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    message: str = ""


@dataclass(frozen=True)
class Verdict:
    """One check's answer for one node."""

    node_id: str
    hostname: str
    fingerprint: str
    checked_at: datetime
    npus: frozenset[int]
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def summary(self) -> str:
        """One line for statuses, Events and `npuswarm nodes`."""
        if self.ok:
            return f"node {self.hostname} passed validation"
        return f"node {self.hostname} failed validation: " + "; ".join(
            c.message for c in self.failures
        )


def fingerprint(node: NodeInfo) -> str:
    """What a verdict depends on: a new engine, changed labels or NPUs ask for a new check."""
    blob = json.dumps(
        [node.engine, sorted(node.labels.items()), sorted(node.npus), sorted(node.reserved)]
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_paths(npus: Iterable[int]) -> list[str]:
    return [f"/dev/davinci{n}" for n in sorted(npus)] + list(CONTROL_DEVICES) + list(DRIVER_FILES)


def judge(
    node: NodeInfo, npus: frozenset[int], found: Mapping[str, Any] | None, now: datetime
) -> Verdict:
    """Turn what the node agent's container found (``missing`` paths, its ``ASCEND_*`` env;
    None: it said nothing) into checks, each failure said so a person can fix it."""
    host = node.hostname or node.id
    if found is None:
        checks = [
            Check(
                AGENT,
                False,
                f"on node {host}, the node agent answered without a validation result "
                "(an agent of another npuswarm version?)",
            )
        ]
    else:
        checks = _from_result(host, npus, found)
    return Verdict(
        node_id=node.id,
        hostname=host,
        fingerprint=fingerprint(node),
        checked_at=now,
        npus=npus,
        checks=tuple(checks),
    )


def _from_result(host: str, npus: frozenset[int], line: Mapping[str, Any]) -> list[Check]:
    """What the container found missing, check by check."""
    missing = {str(p) for p in line.get("missing") or []}
    env = {str(k): str(v) for k, v in (line.get("env") or {}).items()}
    wanted_devices = [f"/dev/davinci{n}" for n in sorted(npus)]
    lost_devices = [d for d in wanted_devices if d in missing]
    lost_control = [d for d in CONTROL_DEVICES if d in missing]
    lost_driver = [d for d in DRIVER_FILES if d in missing]
    runtime_seen = env.get("ASCEND_DOCKER_RUNTIME", "").lower() == "true"
    checks = [Check(AGENT, True)]
    if not runtime_seen and len(lost_devices) == len(wanted_devices):
        checks.append(
            Check(
                RUNTIME,
                False,
                f"Ascend Docker Runtime is not the default runtime on node {host}: a container "
                f"asking for NPUs {format_npu_ids(npus)} got no {_few(wanted_devices)} and no "
                'ASCEND_DOCKER_RUNTIME=True (install it and set "default-runtime": "ascend" '
                "in /etc/docker/daemon.json, then restart docker)",
            )
        )
        return checks
    checks.append(Check(RUNTIME, True))
    checks.append(
        Check(
            DEVICES,
            not lost_devices,
            ""
            if not lost_devices
            else f"on node {host}, ASCEND_VISIBLE_DEVICES={format_npu_ids(npus)} gave no "
            f"{_few(lost_devices)} (NPU missing or its driver not loaded: check `npu-smi info` "
            "and `ls /dev/davinci*` on the node)",
        )
    )
    checks.append(
        Check(
            CONTROL,
            not lost_control,
            ""
            if not lost_control
            else f"on node {host}, the container got no {_few(lost_control)} (the Ascend "
            "driver is not installed or not loaded on the node)",
        )
    )
    checks.append(
        Check(
            DRIVER,
            not lost_driver,
            ""
            if not lost_driver
            else f"on node {host}, the runtime did not mount {_few(lost_driver)} (the driver "
            "is not installed there, or the runtime's mount list lacks it)",
        )
    )
    visible = env.get("ASCEND_VISIBLE_DEVICES")
    env_ok = visible is not None and _same_ids(visible, npus)
    checks.append(
        Check(
            ENV,
            env_ok,
            ""
            if env_ok
            else f"on node {host}, ASCEND_VISIBLE_DEVICES in the container is {visible!r}, "
            f"expected {format_npu_ids(npus)!r} (something rewrites the container env)",
        )
    )
    return checks


def _same_ids(text: str, npus: frozenset[int]) -> bool:
    try:
        return parse_npu_ids(text) == npus
    except ValueError:
        return False


def _few(items: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


@dataclass
class NodeVerdicts:
    """What validation knows: verdicts, and the nodes with a check under way."""

    verdicts: dict[str, Verdict] = field(default_factory=dict)
    checking: frozenset[str] = frozenset()


def unusable_nodes(
    nodes: Iterable[NodeInfo],
    known: NodeVerdicts,
    nodes_with_replicas: Iterable[str],
) -> dict[str, str]:
    """Node id -> why it takes no new replica: it failed its last check, or it has never
    passed one and runs nothing of npuswarm's yet (a node that already runs replicas, e.g.
    after an operator restart, keeps taking them until a check says otherwise)."""
    running = set(nodes_with_replicas)
    found: dict[str, str] = {}
    for node in nodes:
        verdict = known.verdicts.get(node.id)
        if verdict is not None:
            if not verdict.ok:
                found[node.id] = verdict.summary()
        elif node.id not in running and node.usable_npus:
            host = node.hostname or node.id
            found[node.id] = (
                f"node {host} is being validated (its node agent has not answered yet)"
                if node.id in known.checking
                else f"node {host} is not validated yet"
            )
    return found


def changed(before: Mapping[str, Verdict], after: Mapping[str, Verdict]) -> set[str]:
    """Nodes whose verdict now reads differently (passes or says something else)."""
    return {
        node_id
        for node_id in before.keys() | after.keys()
        if _said(before.get(node_id)) != _said(after.get(node_id))
    }


def _said(verdict: Verdict | None) -> str | None:
    return None if verdict is None else verdict.summary()
