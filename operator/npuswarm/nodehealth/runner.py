"""Node checks against Swarm: starts their one-shot services (checks.check_spec for validation,
npusmi.reading_spec for `npu-smi info`), reads their task state and logs back, removes them,
and keeps the verdicts and readings. Only Swarm's Engine API is used (through swarm.Swarm);
every decision is a pure function of nodehealth/checks.py or nodehealth/npusmi.py.

A validation check takes only NPUs the last pass left free, decided under the pass lock, so a
pass never places a replica on NPUs a check holds at the same moment; a pass reads a live
check as a foreign claim. Every check service is removed once read, and stale ones of this
installation are removed at startup.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Protocol

import structlog

from npuswarm import metrics
from npuswarm.core.clock import utcnow
from npuswarm.core.diff import PassPlan
from npuswarm.core.nodes import NodeInfo, NodeLimits
from npuswarm.core.snapshot import SwarmSnapshot
from npuswarm.nodehealth import checks as node_checks
from npuswarm.nodehealth import npusmi
from npuswarm.nodehealth.checks import NodeVerdicts, Verdict
from npuswarm.nodehealth.npusmi import NodeHealth
from npuswarm.settings import Settings
from npuswarm.swarm import SwarmRejected

log = structlog.get_logger("npuswarm.probes")

# A finished check whose log line is not readable yet is read again this many times before
# its exit code alone decides (Swarm fetches logs from the node, a moment after the end).
LOG_ATTEMPTS = 3
MIB = 1024 * 1024


@dataclass
class RunningTask:
    """A check service under way on one node."""

    node: NodeInfo
    service_id: str
    name: str
    npus: frozenset[int]
    started: datetime
    log_attempts: int = 0


class CheckSwarm(Protocol):
    """What node checks need of Swarm (swarm.Swarm has it)."""

    def create_service(self, spec: dict[str, Any]) -> str: ...
    def remove_service(self, service_id: str) -> None: ...
    def service_tasks(self, service_id: str) -> list[dict[str, Any]]: ...
    def service_logs(self, service_id: str) -> str: ...
    def services_labelled(self, *label: str) -> list[dict[str, Any]]: ...


class NodeChecker:
    """Runs node checks and keeps their verdicts and readings; ``step`` is called by a background
    loop."""

    def __init__(
        self,
        swarm: CheckSwarm,
        settings: Settings,
        pass_lock: threading.Lock,
        last_plan: Callable[[], PassPlan | None],
        clock: Callable[[], datetime] = utcnow,
        *,
        clean_stale: bool = True,
    ) -> None:
        self.swarm = swarm
        self.settings = settings
        self.pass_lock = pass_lock
        self.last_plan = last_plan
        self.clock = clock
        self.running: dict[str, RunningTask] = {}
        self.known = NodeVerdicts()
        self._lock = threading.Lock()  # always taken after pass_lock, never before
        # The operator removes check services an earlier run left; a one-off check (the CLI)
        # must not remove the running operator's.
        self._cleaned = not clean_stale
        # NPU health (npusmi.py): readings under way, the last reading per node, since when
        # each (node, NPU) reads unhealthy, and the NPUs the last step withheld.
        self.readings_running: dict[str, RunningTask] = {}
        self.health: dict[str, NodeHealth] = {}
        self.since: dict[tuple[str, int], datetime] = {}
        self._withheld: dict[str, dict[int, str]] = {}

    # -- read by the pass (under the pass lock) -------------------------------------------

    def unusable(self, snapshot: SwarmSnapshot) -> NodeLimits:
        """Nodes and NPUs kept out of placement, for the pass that observed ``snapshot``."""
        with self._lock:
            known = NodeVerdicts(dict(self.known.verdicts), frozenset(self.running))
        with_replicas = {a.node_id for a in snapshot.allocations() if not a.foreign}
        withheld = self.withheld(snapshot)
        blocked = node_checks.unusable_nodes(snapshot.nodes, known, with_replicas)
        return NodeLimits(
            nodes=blocked,
            pending=frozenset(n for n in blocked if n not in known.verdicts),
            npus=withheld.unhealthy,
            busy=withheld.busy,
        )

    def withheld(self, snapshot: SwarmSnapshot) -> npusmi.Withheld:
        """NPUs placement must leave alone now (unhealthy, or busy with others' processes)."""
        with self._lock:
            health, since = dict(self.health), dict(self.since)
        return npusmi.withheld_npus(
            health,
            since,
            held_npus(snapshot),
            self.clock(),
            self.settings.npu_unhealthy_grace_seconds,
        )

    def npu_report(self) -> list[tuple[str, int, bool, int, bool]]:
        """(node, NPU, healthy, HBM used bytes, holds a replica) of the last readings."""
        plan = self.last_plan()
        held = held_npus(plan.snapshot) if plan is not None else {}
        with self._lock:
            readings = list(self.health.values())
        return [
            (h.hostname, npu, r.healthy, r.hbm_used_mb * MIB, npu in held.get(h.node_id, set()))
            for h in sorted(readings, key=lambda h: h.hostname)
            if not h.error
            for npu, r in sorted(h.npus.items())
        ]

    def verdicts(self) -> dict[str, Verdict]:
        with self._lock:
            return dict(self.known.verdicts)

    def readings(self) -> dict[str, NodeHealth]:
        with self._lock:
            return dict(self.health)

    # -- the loop's work ---------------------------------------------------------------------

    def step(self, wanted: Sequence[tuple[dict[str, str], str]]) -> set[str]:
        """Read finished checks, start the checks that are due. ``wanted``: (nodeSelector,
        image) of every deployment, oldest first. Returns the nodes whose verdict changed."""
        swarm = self.swarm
        if not self._cleaned:
            self._remove_stale()
            self._cleaned = True
        before = self.verdicts()
        for node_id, task in list(self.running.items()):
            verdict = self._read(task)
            if verdict is None:
                continue
            _remove(swarm, task.service_id)
            with self._lock:
                del self.running[node_id]
                self.known.verdicts[node_id] = verdict
            log.info(
                "node validated",
                node=verdict.hostname,
                ok=verdict.ok,
                verdict=verdict.summary(),
                probe_seconds=round((verdict.checked_at - task.started).total_seconds(), 1),
            )
        self._start_due(wanted)
        changed = node_checks.changed(before, self.verdicts())
        if self.settings.npu_health:
            changed |= self._readings_step(wanted)
        return changed

    def _readings_step(self, wanted: Sequence[tuple[dict[str, str], str]]) -> set[str]:
        """Read finished npu-smi readings, start due ones; the nodes whose withheld NPUs changed
        (a new reading, or a grace period that ran out)."""
        now = self.clock()
        for node_id, task in list(self.readings_running.items()):
            result = node_checks.task_result(self.swarm.service_tasks(task.service_id))
            timed_out = (now - task.started).total_seconds() >= (
                self.settings.node_probe_timeout_seconds
            )
            if not node_checks.finished(result) and not timed_out:
                continue
            text = self.swarm.service_logs(task.service_id) if node_checks.finished(result) else ""
            readings = npusmi.parse_npu_smi(text)
            if not readings and result.exit_code is not None and not timed_out:
                task.log_attempts += 1
                if task.log_attempts < LOG_ATTEMPTS:
                    continue
            error = "" if readings else f"no npu-smi table ({result.state}: {result.error})"
            reading = NodeHealth(node_id, task.node.hostname, now, readings, error)
            _remove(self.swarm, task.service_id)
            with self._lock:
                del self.readings_running[node_id]
                self.health[node_id] = reading
                self.since = npusmi.unhealthy_since(self.since, reading)
            if error:
                log.warning("npu health not read", node=task.node.hostname, error=error)
        self._start_readings_due(wanted)
        plan = self.last_plan()
        if plan is None:
            return set()
        withheld = self.withheld(plan.snapshot).all()
        changed = {
            node_id
            for node_id in withheld.keys() | self._withheld.keys()
            if withheld.get(node_id) != self._withheld.get(node_id)
        }
        for node_id in changed:
            log.info("npus withheld", node=node_id, npus=withheld.get(node_id, {}))
        self._withheld = withheld
        return changed

    def _start_readings_due(self, wanted: Sequence[tuple[dict[str, str], str]]) -> None:
        """An npu-smi reading shares NPUs with replicas (it only reads): no pass lock."""
        plan = self.last_plan()
        if plan is None:
            return
        now = self.clock()
        verdicts = self.verdicts()
        for node in plan.snapshot.nodes:
            verdict = verdicts.get(node.id)
            if node.id in self.readings_running or node.state != "ready" or not node.npus:
                continue
            if verdict is None or not verdict.ok:
                continue  # no runtime, no npu-smi: validation says so already
            last = self.health.get(node.id)
            if last is not None and (now - last.read_at).total_seconds() < (
                self.settings.npu_health_seconds
            ):
                continue
            image = self.settings.node_probe_image or node_checks.wanted_image(node, wanted)
            if not image:
                continue
            spec = npusmi.reading_spec(node, image, self.settings.instance, _nonce())
            try:
                service_id = _create_task(self.swarm, spec)
            except SwarmRejected as error:
                log.warning("health probe refused", node=node.hostname, error=str(error))
                continue
            with self._lock:
                self.readings_running[node.id] = RunningTask(
                    node, service_id, spec["Name"], node.npus, now
                )

    def _read(self, task: RunningTask) -> Verdict | None:
        now = self.clock()
        result = node_checks.task_result(self.swarm.service_tasks(task.service_id))
        timed_out = (now - task.started).total_seconds() >= (
            self.settings.node_probe_timeout_seconds
        )
        if not node_checks.finished(result) and not timed_out:
            return None
        if node_checks.finished(result):
            line = node_checks.result_line(self.swarm.service_logs(task.service_id))
            if line is None and result.exit_code is not None and not timed_out:
                task.log_attempts += 1
                if task.log_attempts < LOG_ATTEMPTS:
                    return None
            result = replace(result, line=line)
        return node_checks.judge(task.node, task.npus, result, now, timed_out=timed_out)

    def _start_due(self, wanted: Sequence[tuple[dict[str, str], str]]) -> None:
        settings = self.settings
        with self.pass_lock:
            plan = self.last_plan()
            if plan is None:
                return
            snapshot = plan.snapshot
            free: Mapping[str, set[int]] = plan.placement.free
            now = self.clock()
            present = {node.id for node in snapshot.nodes}
            with self._lock:
                for node_id in list(self.known.verdicts):
                    node = snapshot.node(node_id)
                    # A node that left or went down is validated again when it is back: its
                    # engine may have been reconfigured meanwhile.
                    if node_id not in present or (node is not None and node.state != "ready"):
                        del self.known.verdicts[node_id]
            for node in snapshot.nodes:
                if node.id in self.running:
                    continue
                reason = node_checks.check_reason(
                    node,
                    self.known.verdicts.get(node.id),
                    now,
                    check_seconds=settings.node_check_seconds,
                    recheck_failed_seconds=settings.node_recheck_failed_seconds,
                )
                if reason is None:
                    continue
                image = settings.node_probe_image or node_checks.wanted_image(node, wanted)
                npus = node_checks.check_npus(node, free.get(node.id, ()))
                if not image or not npus:
                    continue  # nobody wants the node, or all its NPUs are in use
                spec = node_checks.check_spec(node, npus, image, settings.instance, _nonce())
                try:
                    service_id = _create_task(self.swarm, spec)
                except SwarmRejected as error:
                    log.warning("probe refused", node=node.hostname, error=str(error))
                    continue
                with self._lock:
                    self.running[node.id] = RunningTask(node, service_id, spec["Name"], npus, now)
                log.info("node probe started", node=node.hostname, reason=reason, image=image)

    def _remove_stale(self) -> None:
        """Check services of this installation left by an earlier run (a crash between start and
        read)."""
        instance = self.settings.instance
        mine = {p.service_id for p in [*self.running.values(), *self.readings_running.values()]}
        for key in (node_checks.CHECK, npusmi.READING):
            for service in self.swarm.services_labelled(f"{key}={instance}"):
                if service.get("ID") not in mine:
                    _remove(self.swarm, service["ID"])
                    log.info("stale probe removed", service=service.get("Spec", {}).get("Name"))

    def close(self) -> None:
        """Remove check services under way (operator stopping)."""
        for task in [*self.running.values(), *self.readings_running.values()]:
            _remove(self.swarm, task.service_id)
        self.running.clear()
        self.readings_running.clear()


def held_npus(snapshot: SwarmSnapshot) -> dict[str, set[int]]:
    """NPUs this installation's replicas hold, per node."""
    held: dict[str, set[int]] = {}
    for allocation in snapshot.allocations():
        if not allocation.foreign:
            held.setdefault(allocation.node_id, set()).update(allocation.npus)
    return held


def _create_task(swarm: CheckSwarm, spec: dict[str, Any]) -> str:
    """A replicated job where the manager has them (API 1.41, Docker 20.10); an older one
    refuses the mode, and one replica that is never restarted does the same job."""
    try:
        return swarm.create_service(spec)
    except SwarmRejected as error:
        if "ReplicatedJob" not in spec.get("Mode", {}):
            raise
        log.info("replicated jobs refused; checking with a replicated service", error=str(error))
        return swarm.create_service(dict(spec, Mode={"Replicated": {"Replicas": 1}}))


def _remove(swarm: CheckSwarm, service_id: str) -> None:
    swarm.remove_service(service_id)


def _nonce() -> str:
    return uuid.uuid4().hex[:8]


def publish_verdicts(checker: NodeChecker | None) -> None:
    """npuswarm_node_validation reads this checker's verdicts (None: no series)."""

    def checks() -> list[tuple[str, str, bool]]:
        assert checker is not None
        return [
            (verdict.hostname, check.name, check.ok)
            for verdict in sorted(checker.verdicts().values(), key=lambda v: v.hostname)
            for check in verdict.checks
        ]

    metrics.node_validation.source = checks if checker is not None else None
    metrics.npu_health.source = checker.npu_report if checker is not None else None
