"""Node validation: does a node's Ascend Docker Runtime really give NPUs to containers? Pure.

A node check is a one-shot Swarm service pinned to one node that asks for NPUs exactly as a
replica does (``ASCEND_VISIBLE_DEVICES`` in its env) and looks, inside its container, for
what the runtime must deliver: the ``/dev/davinciN`` nodes, the driver's management devices
and the driver files of the runtime's mount list. It prints one JSON line; these functions
decide which nodes need a check, build its service spec, turn its result into checks a person
can act on, and say which nodes take no new replicas. nodehealth/runner.py runs them against
Swarm. (Their labels and names still say "probe": they are what Swarm holds, kept as they
were so an upgrade finds the services an earlier version left.)
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

# Check services carry these labels and never npuswarm's managed-by label: they are not
# replicas, so a pass reads them as foreign claims (their NPUs are taken while they live)
# and never removes them as orphans.
CHECK = f"{labels.PREFIX}/node-probe"  # value: the installation (NPUSWARM_INSTANCE)
CHECK_NODE = f"{labels.PREFIX}/probe-node"
CHECK_NPUS = f"{labels.PREFIX}/probe-npus"
CHECK_FINGERPRINT = f"{labels.PREFIX}/probe-fingerprint"
NAME_PREFIX = "npuswarm-probe"

RESULT_MARK = "NPUSWARM-PROBE "
# What Ascend Docker Runtime mounts besides the NPUs (its base.list): the driver's
# management devices and the driver files vllm-ascend needs.
CONTROL_DEVICES = ("/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc")
DRIVER_FILES = ("/usr/local/Ascend/driver/lib64", "/usr/local/dcmi", "/usr/local/bin/npu-smi")
# Exit code of a check that found something missing (an uncommon one: python3 itself exits
# 1 or 2 when it breaks, and that must not read as a verdict).
MISSING_EXIT = 65
# Runs as `python3 -c`: python3 is in every vLLM image; a shell's `test -e` is not enough
# to report which paths are missing in one machine-readable line.
SCRIPT = (
    "import json, os\n"
    "paths = [p for p in os.environ.get('NPUSWARM_PROBE_PATHS', '').split(',') if p]\n"
    "missing = [p for p in paths if not os.path.exists(p)]\n"
    "env = {k: v for k, v in os.environ.items() if k.startswith('ASCEND_')}\n"
    f"print({RESULT_MARK!r} + json.dumps({{'missing': missing, 'env': env}}), flush=True)\n"
    f"raise SystemExit({MISSING_EXIT} if missing else 0)\n"
)

# Check names: the `check` label of npuswarm_node_validation; bounded.
RUNTIME = "runtime"
DEVICES = "npu-devices"
CONTROL = "control-devices"
DRIVER = "driver-files"
ENV = "env"
CHECK_TASK = "probe-task"
CHECKS = (RUNTIME, DEVICES, CONTROL, DRIVER, ENV, CHECK_TASK)

TERMINAL_STATES = frozenset({"complete", "failed", "rejected", "shutdown", "orphaned", "remove"})


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


@dataclass(frozen=True)
class TaskResult:
    """What a check's task and logs said: the JSON line (if any), the task's state, its
    error and exit code."""

    state: str
    line: dict[str, Any] | None = None
    error: str = ""
    exit_code: int | None = None


def fingerprint(node: NodeInfo) -> str:
    """What a verdict depends on: a new engine, changed labels or NPUs ask for a new check."""
    blob = json.dumps(
        [node.engine, sorted(node.labels.items()), sorted(node.npus), sorted(node.reserved)]
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_reason(
    node: NodeInfo,
    verdict: Verdict | None,
    now: datetime,
    *,
    check_seconds: float,
    recheck_failed_seconds: float,
) -> str | None:
    """Why ``node`` needs a check now, or None. Only ready, active nodes with NPUs."""
    if node.state != "ready" or node.availability != "active" or not node.usable_npus:
        return None
    if verdict is None:
        return "not validated yet"
    if verdict.fingerprint != fingerprint(node):
        return "engine, labels or NPUs changed"
    age = (now - verdict.checked_at).total_seconds()
    if verdict.ok and age >= check_seconds:
        return f"last validated {age:.0f}s ago"
    if not verdict.ok and age >= recheck_failed_seconds:
        return "failed validation; checking again"
    return None


def check_npus(node: NodeInfo, free: Iterable[int]) -> frozenset[int]:
    """The NPUs a check may ask for: those no replica holds or was just given. A node full
    of replicas is not checked (its NPUs are in use: the replicas are the proof)."""
    return frozenset(free) & node.usable_npus


def check_paths(npus: Iterable[int]) -> list[str]:
    return [f"/dev/davinci{n}" for n in sorted(npus)] + list(CONTROL_DEVICES) + list(DRIVER_FILES)


def check_service_name(instance: str, node_id: str, nonce: str) -> str:
    return f"{NAME_PREFIX}-{instance}-{node_id[:12]}-{nonce}"[:63]


def check_spec(
    node: NodeInfo, npus: frozenset[int], image: str, instance: str, nonce: str
) -> dict[str, Any]:
    """A Swarm ServiceSpec (Engine API JSON) for one check: a replicated job of one task,
    pinned by node id, never restarted, asking for ``npus`` the way core/render.py's replicas do."""
    env = {
        "ASCEND_VISIBLE_DEVICES": format_npu_ids(npus),
        "ASCEND_RT_VISIBLE_DEVICES": format_npu_ids(range(len(npus))),
        "NPUSWARM_PROBE_PATHS": ",".join(check_paths(npus)),
    }
    check_labels = {
        CHECK: instance,
        CHECK_NODE: node.id,
        CHECK_NPUS: format_npu_ids(npus),
        CHECK_FINGERPRINT: fingerprint(node),
    }
    return {
        "Name": check_service_name(instance, node.id, nonce),
        "Labels": check_labels,
        "TaskTemplate": {
            "ContainerSpec": {
                "Image": image,
                "Command": ["python3", "-c", SCRIPT],
                "Env": [f"{k}={v}" for k, v in sorted(env.items())],
                "Labels": dict(check_labels),
            },
            "Placement": {"Constraints": [f"node.id=={node.id}"]},
            "RestartPolicy": {"Condition": "none", "MaxAttempts": 0},
        },
        # A job: Swarm runs the task once and leaves it complete (API 1.41).
        "Mode": {"ReplicatedJob": {"MaxConcurrent": 1, "TotalCompletions": 1}},
    }


def is_check_of(service_labels: Mapping[str, str], instance: str) -> bool:
    return service_labels.get(CHECK) == instance


def result_line(log_text: str) -> dict[str, Any] | None:
    """The check's JSON line out of its logs (Docker may prefix lines; the last one wins)."""
    found = None
    for line in log_text.splitlines():
        _, mark, rest = line.partition(RESULT_MARK)
        if not mark:
            continue
        try:
            parsed = json.loads(rest)
        except ValueError:
            continue
        if isinstance(parsed, dict):
            found = parsed
    return found


def task_result(tasks: Sequence[Mapping[str, Any]]) -> TaskResult:
    """The newest task's state, error and exit code (a job has one task)."""
    if not tasks:
        return TaskResult(state="pending")
    task = max(tasks, key=lambda t: (str(t.get("CreatedAt", "")), str(t.get("ID", ""))))
    status = task.get("Status") or {}
    container = status.get("ContainerStatus") or {}
    code = container.get("ExitCode")
    return TaskResult(
        state=str(status.get("State", "unknown")),
        error=str(status.get("Err") or ""),
        exit_code=int(code) if isinstance(code, int) else None,
    )


def finished(result: TaskResult) -> bool:
    return result.state in TERMINAL_STATES


def judge(
    node: NodeInfo,
    npus: frozenset[int],
    result: TaskResult,
    now: datetime,
    *,
    timed_out: bool = False,
) -> Verdict:
    """Turn a check's result into checks, each failure said so a person can fix it."""
    host = node.hostname or node.id
    checks = _checks(host, npus, result, timed_out)
    return Verdict(
        node_id=node.id,
        hostname=host,
        fingerprint=fingerprint(node),
        checked_at=now,
        npus=npus,
        checks=tuple(checks),
    )


def _checks(host: str, npus: frozenset[int], result: TaskResult, timed_out: bool) -> list[Check]:
    if result.line is None:
        return _without_result(host, result, timed_out)
    return _from_result(host, npus, result.line)


def _without_result(host: str, result: TaskResult, timed_out: bool) -> list[Check]:
    """The check task printed no result line: its state and exit code are all there is."""
    if timed_out:
        why = f"the probe task did not finish in time (state {result.state}"
        why += f": {result.error})" if result.error else ")"
    elif result.state in ("failed", "rejected") and result.error:
        why = f"the probe task could not run: {result.error}"
    elif result.exit_code == 0:
        # Ran and passed, but its log line was not readable (a log driver Docker cannot
        # read back): the exit code is the verdict.
        return [Check(name, True) for name in CHECKS]
    elif result.exit_code == MISSING_EXIT:
        why = (
            "the container lacked devices or driver files the runtime should provide "
            "(details not readable from the logs)"
        )
        return [Check(RUNTIME, False, f"on node {host}, {why}")]
    else:
        why = f"the probe task ended {result.state} without a result: {result.error or '?'}"
    return [Check(CHECK_TASK, False, f"on node {host}, {why}")]


def _from_result(host: str, npus: frozenset[int], line: dict[str, Any]) -> list[Check]:
    """What the container found missing, check by check."""
    missing = {str(p) for p in line.get("missing") or []}
    env = {str(k): str(v) for k, v in (line.get("env") or {}).items()}
    wanted_devices = [f"/dev/davinci{n}" for n in sorted(npus)]
    lost_devices = [d for d in wanted_devices if d in missing]
    lost_control = [d for d in CONTROL_DEVICES if d in missing]
    lost_driver = [d for d in DRIVER_FILES if d in missing]
    runtime_seen = env.get("ASCEND_DOCKER_RUNTIME", "").lower() == "true"
    checks = [Check(CHECK_TASK, True)]
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
                f"node {host} is being validated (probe under way)"
                if node.id in known.checking
                else f"node {host} is not validated yet"
            )
    return found


def wanted_image(node: NodeInfo, selectors_and_images: Sequence[tuple[dict[str, str], str]]) -> str:
    """The image of the first (oldest) deployment whose nodeSelector matches the node, or ''."""
    for selector, image in selectors_and_images:
        if node.matches(selector):
            return image
    return ""


def changed(before: Mapping[str, Verdict], after: Mapping[str, Verdict]) -> set[str]:
    """Nodes whose verdict now reads differently (passes or says something else)."""
    return {
        node_id
        for node_id in before.keys() | after.keys()
        if _said(before.get(node_id)) != _said(after.get(node_id))
    }


def _said(verdict: Verdict | None) -> str | None:
    return None if verdict is None else verdict.summary()
