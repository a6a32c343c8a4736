"""Node checks against Swarm and the node agents (docs/node-health.md): keeps one agent service
per NPU set and the node label that places it (nodehealth/agents.py), reads every agent over
the signed channel (gateway/protocol.py), and keeps the verdicts and readings the pass takes.
Every decision is a pure function of nodehealth/agents.py, checks.py or npusmi.py.

No Swarm service is created or removed in steady state: agent services and node labels are
written only when the fleet's NPU sets change (or one was changed by hand), and the probe
services of earlier versions are removed once, at startup.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Protocol

import structlog

from npuswarm import metrics
from npuswarm.core import hostfiles
from npuswarm.core.clock import utcnow
from npuswarm.core.diff import PassPlan
from npuswarm.core.nodes import NodeInfo, NodeLimits
from npuswarm.core.snapshot import ObservedSecret, SwarmSnapshot
from npuswarm.gateway import protocol
from npuswarm.gateway.credentials import Credentials
from npuswarm.gateway.service import SecretMount
from npuswarm.nodehealth import agents, npusmi, roce
from npuswarm.nodehealth import checks as node_checks
from npuswarm.nodehealth.checks import NodeVerdicts, Verdict
from npuswarm.nodehealth.npusmi import NodeHealth
from npuswarm.settings import Settings
from npuswarm.swarm import SwarmRejected, SwarmUnavailable

log = structlog.get_logger("npuswarm.nodehealth")
READ_CONCURRENCY = 32
READ_TIMEOUT_SECONDS = 5.0
# Agent services are listed again this often even when no NPU set changed: a service removed
# or edited by hand is put back (Swarm itself restarts a killed agent task).
REPAIR_SECONDS = 300.0
# After a start or an agent write, nodes without a verdict are read every second this long.
SETTLE_SECONDS = 120.0
SETTLE_POLL_SECONDS = 1.0
# A fault on one NPU: (node id, NPU, its error codes).
Occurrence = tuple[str, int, tuple[str, ...]]
NO_KEY = "node checks need NPUSWARM_ROOT_KEY (the node agents' credential derives from it)"
NO_IMAGE = "node checks need NPUSWARM_AGENT_IMAGE (the operator's own image runs the agents)"


class CheckSwarm(Protocol):
    """What node checks need of Swarm (swarm.Swarm has it)."""

    def create_service(self, spec: dict[str, Any]) -> str: ...
    def update_service(self, service_id: str, version: int, spec: dict[str, Any]) -> None: ...
    def remove_service(self, service_id: str) -> None: ...
    def services_labelled(self, *label: str) -> list[dict[str, Any]]: ...
    def secrets_labelled(self, *label: str) -> list[dict[str, Any]]: ...
    def create_secret(self, name: str, data: bytes, secret_labels: dict[str, str]) -> str: ...
    def remove_secret(self, secret_id: str) -> None: ...
    def set_node_label(self, node_id: str, key: str, value: str) -> None: ...


@dataclass(frozen=True)
class Answer:
    """One read of one agent: its document (None: no answer) and why not."""

    document: dict[str, Any] | None
    error: str = ""


@dataclass(frozen=True)
class _Parsed:
    document: dict[str, Any]
    node: NodeInfo
    verdict: Verdict
    reading: NodeHealth
    links: dict[int, roce.RoceLink] | None


class AgentReader:
    """Reads agents over TLS (npuswarm's CA, the agents' name), signed, with a keep-alive
    connection per node and a conditional read (an unchanged agent answers 304)."""

    def __init__(
        self,
        credentials: Credentials,
        port: int,
        timeout: float = READ_TIMEOUT_SECONDS,
        concurrency: int = READ_CONCURRENCY,
    ) -> None:
        self.credential = credentials.credential(agents.IDENTITY)
        self.context = credentials.client_context()
        self.port = port
        self.timeout = timeout
        self.signer = protocol.Signer()
        self._connections: dict[str, protocol.PinnedHTTPS] = {}
        self._last: dict[str, tuple[str, dict[str, Any]]] = {}  # node id -> (ETag, document)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="agent-read")

    def read(
        self, nodes: Sequence[NodeInfo], paths: Mapping[str, Sequence[str]] | None = None
    ) -> dict[str, Answer]:
        """Each node's answer; ``paths``: node id -> the host paths its agent is asked
        about (core/hostfiles.py), sent in the signed body of a POST."""
        asked = paths or {}

        def one(node: NodeInfo) -> Answer:
            return self._read_one(node, asked.get(node.id, ()))

        return dict(zip((n.id for n in nodes), self._pool.map(one, nodes), strict=True))

    def _read_one(self, node: NodeInfo, paths: Sequence[str] = ()) -> Answer:
        if not node.addr:
            return Answer(None, "the node has no address in Swarm")
        with self._lock:
            connection = self._connections.pop(node.id, None)
            last = self._last.get(node.id)
        if connection is None or connection.host != node.addr:
            connection = protocol.PinnedHTTPS(
                node.addr, self.port, agents.IDENTITY.hostname, self.context, self.timeout
            )
        path = agents.STATE_PATH
        method = "POST" if paths else "GET"
        request = json.dumps({"paths": list(paths)}).encode() if paths else b""
        headers = self.signer.headers(self.credential, method, path, request)
        if last is not None:
            headers["If-None-Match"] = last[0]
        try:
            connection.request(method, path, body=request or None, headers=headers)
            response = connection.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            return Answer(None, f"{node.addr}:{self.port}: {error}")
        with self._lock:
            self._connections[node.id] = connection
        if response.status == 304 and last is not None:
            return Answer(last[1])
        if response.status != 200:
            return Answer(None, f"{response.status}: {body[:200].decode(errors='replace')}")
        try:
            document = json.loads(body)
        except ValueError as error:
            return Answer(None, f"unreadable answer: {error}")
        with self._lock:
            self._last[node.id] = (response.getheader("ETag") or "", document)
        return Answer(document)

    def forget(self, keep: set[str]) -> None:
        """Drop connections and answers of nodes that are gone."""
        with self._lock:
            for node_id in set(self._connections) - keep:
                self._connections.pop(node_id).close()
            for node_id in set(self._last) - keep:
                del self._last[node_id]

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            for connection in self._connections.values():
                connection.close()
            self._connections.clear()


class NodeChecker:
    """Keeps the agents running and their verdicts and readings; ``step`` is called by a
    background loop."""

    def __init__(
        self,
        swarm: CheckSwarm,
        settings: Settings,
        last_plan: Callable[[], PassPlan | None],
        credentials: Credentials | None,
        clock: Callable[[], datetime] = utcnow,
        *,
        manage: bool = True,
        reader: AgentReader | None = None,
    ) -> None:
        self.swarm = swarm
        self.settings = settings
        self.last_plan = last_plan
        self.clock = clock
        self.credentials = credentials
        # The operator runs the agents; a one-off reader (the CLI) only reads them.
        self.manage = manage
        if reader is None and credentials is not None:
            reader = AgentReader(credentials, settings.agent_port)
        self.reader = reader
        self.problem = NO_KEY if credentials is None else "" if settings.agent_image else NO_IMAGE
        if self.problem and manage:
            log.error("node agents not run", why=self.problem)
        self.known = NodeVerdicts()
        self.health: dict[str, NodeHealth] = {}
        self.since: dict[tuple[str, int], datetime] = {}
        self.up: dict[str, tuple[str, bool]] = {}  # node id -> (hostname, agent answered)
        # node id -> its NPUs' RoCE links (None: no hccn_tool there), from the last answer.
        self.roce: dict[str, dict[int, roce.RoceLink] | None] = {}
        # node id -> host path -> what its agent found (core/hostfiles.py), from the last
        # answer; and the paths each node was last asked about.
        self.files: dict[str, dict[str, hostfiles.PathCheck]] = {}
        self._asked: dict[str, tuple[str, ...]] = {}
        self.fault_table = settings.fault_table()
        # Fault occurrences (node, NPU, codes) whose replica was restarted in place: once each.
        self._restarted: set[Occurrence] = set()
        self._read_at: dict[str, float] = {}
        self._parsed: dict[str, _Parsed] = {}  # node id -> its last answer, judged
        self._withheld: dict[str, dict[int, str]] = {}
        self._cleaned = not manage
        self._ensured: tuple[str, float] | None = None  # (what was ensured, when)
        # Node id -> the label written since the snapshot _labelled_in was observed.
        self._labelled: dict[str, str] = {}
        self._labelled_in: SwarmSnapshot | None = None
        # Since when agents may be starting: this checker's start, or its last agent write.
        self._settle_from = time.monotonic()
        self._lock = threading.Lock()

    # -- read by the pass (under the pass lock) -------------------------------------------

    def unusable(self, snapshot: SwarmSnapshot) -> NodeLimits:
        """Nodes and NPUs kept out of placement, for the pass that observed ``snapshot``."""
        with self._lock:
            verdicts = dict(self.known.verdicts)
        waiting = frozenset(n.id for n in agents.agent_nodes(snapshot.nodes)) - verdicts.keys()
        known = NodeVerdicts(verdicts, frozenset() if self.problem else waiting)
        with_replicas = {a.node_id for a in snapshot.allocations() if not a.foreign}
        withheld = self.withheld(snapshot)
        blocked = node_checks.unusable_nodes(snapshot.nodes, known, with_replicas)
        if self.problem:
            blocked = {
                node_id: f"{why}: {self.problem}" if node_id not in verdicts else why
                for node_id, why in blocked.items()
            }
        with self._lock:
            links = dict(self.roce)
        hostnames = {node.id: node.hostname or node.id for node in snapshot.nodes}
        roce_problems = {
            node_id: why
            for node_id, found in links.items()
            if node_id in hostnames and (why := roce.problem(hostnames[node_id], found))
        }
        with self._lock:
            files = None if self.problem or self.reader is None else dict(self.files)
            health = dict(self.health)
        for node_id, why in faults_isolating_nodes(health).items():
            blocked[node_id] = f"{blocked[node_id]}; {why}" if node_id in blocked else why
        return NodeLimits(
            restart=self._restarts(snapshot, health),
            nodes=blocked,
            pending=frozenset(n for n in blocked if n not in verdicts and not self.problem),
            npus=withheld.unhealthy,
            busy=withheld.busy,
            roce=roce_problems,
            files=files,
        )

    def _restarts(
        self, snapshot: SwarmSnapshot, health: Mapping[str, NodeHealth]
    ) -> dict[tuple[str, str], str]:
        """Replicas to restart in place (deployment, slot) -> why: those on an NPU whose
        fault is graded restart, once per occurrence (the same codes on the same NPU); an
        occurrence that clears is forgotten, so the next one restarts again."""
        current: set[Occurrence] = set()
        due: dict[tuple[str, int], tuple[Occurrence, str]] = {}
        for node_id, reading in health.items():
            if reading.error:
                continue
            for npu, found in reading.npus.items():
                if found.fault is not None and found.fault.action == "restart":
                    occurrence = (node_id, npu, found.fault.codes)
                    current.add(occurrence)
                    if occurrence not in self._restarted:
                        why = f"NPU {npu} on node {reading.hostname}: {found.fault.describe()}"
                        due[(node_id, npu)] = (occurrence, why)
        restart: dict[tuple[str, str], str] = {}
        for allocation in snapshot.allocations() if due else ():
            if allocation.foreign:
                continue
            for npu in sorted(allocation.npus):
                if (allocation.node_id, npu) in due:
                    occurrence, why = due[(allocation.node_id, npu)]
                    restart[allocation.key] = why
                    self._restarted.add(occurrence)
                    log.info("replica restarted in place", replica=allocation.key, why=why)
                    break
        # Kept while the reading still shows them; unreadable nodes keep theirs.
        unread = {node_id for node_id, reading in health.items() if reading.error}
        self._restarted = {o for o in self._restarted if o in current or o[0] in unread}
        return restart

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

    def next_grace_end(self) -> float | None:
        """Seconds until the soonest unhealthy NPU's grace ends (its replica then moves), if
        one is still running: the loop steps then rather than at its next poll."""
        grace = self.settings.npu_unhealthy_grace_seconds
        now = self.clock()
        with self._lock:
            ends = [(t - now).total_seconds() + grace for t in self.since.values()]
        upcoming = [end for end in ends if end > 0]
        return min(upcoming) if upcoming else None

    def npu_report(self) -> list[tuple[str, int, bool, bool]]:
        """(node, NPU, healthy, holds a replica) of the last readings."""
        plan = self.last_plan()
        held = held_npus(plan.snapshot) if plan is not None else {}
        with self._lock:
            readings = list(self.health.values())
        return [
            (h.hostname, npu, r.healthy, npu in held.get(h.node_id, set()))
            for h in sorted(readings, key=lambda h: h.hostname)
            if not h.error
            for npu, r in sorted(h.npus.items())
        ]

    def host_files(self) -> dict[str, dict[str, hostfiles.PathCheck]]:
        """Node id -> host path -> what its agent found, for `npuswarm nodes`."""
        with self._lock:
            return {node_id: dict(found) for node_id, found in self.files.items()}

    def roce_links(self) -> dict[str, dict[int, roce.RoceLink] | None]:
        with self._lock:
            return dict(self.roce)

    def agents_up(self) -> list[tuple[str, bool]]:
        """(node, its agent answered the last read) for npuswarm_node_agent_up."""
        with self._lock:
            return sorted(self.up.values())

    def verdicts(self) -> dict[str, Verdict]:
        with self._lock:
            return dict(self.known.verdicts)

    def readings(self) -> dict[str, NodeHealth]:
        with self._lock:
            return dict(self.health)

    # -- the loop's work ---------------------------------------------------------------------

    def step(self) -> set[str]:
        """Keep the agents, read those due. Returns the nodes whose verdict or withheld NPUs
        changed (a pass is due)."""
        if not self._cleaned:
            self._remove_stale()
            self._cleaned = True
        plan = self.last_plan()
        if plan is None:
            return set()
        nodes = agents.agent_nodes(plan.snapshot.nodes)
        if self.manage and not self.problem:
            try:
                self._ensure_agents(nodes, plan.snapshot)
            except (SwarmRejected, SwarmUnavailable) as error:
                # The agents that run are still read; the next step tries the writes again.
                log.warning("node agents not written", error=str(error))
                self._ensured = None
        before = self.verdicts()
        files_before = self.host_files()
        self._read_agents(nodes, self._paths(plan))
        changed = node_checks.changed(before, self.verdicts())
        files_after = self.host_files()
        changed |= {
            node_id
            for node_id in files_before.keys() | files_after.keys()
            if files_before.get(node_id) != files_after.get(node_id)
        }
        withheld = self.withheld(plan.snapshot).all()
        moved = {
            node_id
            for node_id in withheld.keys() | self._withheld.keys()
            if withheld.get(node_id) != self._withheld.get(node_id)
        }
        for node_id in moved:
            log.info("npus withheld", node=node_id, npus=withheld.get(node_id, {}))
        self._withheld = withheld
        return changed | moved

    def settling(self) -> bool:
        """Whether node agents are still coming up: no pass has run yet, or a ready NPU node
        has no verdict within SETTLE_SECONDS of this checker's start or its last agent write.
        The loop then steps every second, so a fresh start places replicas a second after the
        agents answer, not one or two poll intervals later; an agent that never answers is
        read at the normal interval once the window ends."""
        plan = self.last_plan()
        if plan is None:
            return True
        if time.monotonic() - self._settle_from > SETTLE_SECONDS:
            return False
        nodes = agents.agent_nodes(plan.snapshot.nodes)
        return any(n.state == "ready" and n.id not in self.known.verdicts for n in nodes)

    def read_now(
        self, nodes: Sequence[NodeInfo], paths: Mapping[str, tuple[str, ...]] | None = None
    ) -> None:
        """Read every agent of ``nodes`` once, now (`npuswarm nodes --validate`)."""
        self._read_at.clear()
        self._read_agents(list(nodes), paths or {})

    @staticmethod
    def _paths(plan: PassPlan) -> dict[str, tuple[str, ...]]:
        """Node id -> the host paths of the deployments that want it (bounded per node)."""
        deployments = [p.md for p in plan.plans.values()]
        return hostfiles.paths_by_node(deployments, agents.agent_nodes(plan.snapshot.nodes))

    def _read_agents(
        self, nodes: Sequence[NodeInfo], paths: Mapping[str, tuple[str, ...]] | None = None
    ) -> None:
        if self.reader is None:
            return
        asked = paths or {}
        by_id = {node.id: node for node in nodes}
        present = set(by_id)
        now_s = time.monotonic()
        due = [
            node
            for node in nodes
            if node.state == "ready"
            and (
                node.id not in self.known.verdicts
                or now_s - self._read_at.get(node.id, 0.0) >= self.settings.npu_health_seconds
                # A deployment wants paths its agent was not asked about: ask now, so that
                # its replicas wait seconds, not a reading interval.
                or asked.get(node.id, ()) != self._asked.get(node.id, ())
            )
        ]
        answers = self.reader.read(due, asked) if due else {}
        now = self.clock()
        with self._lock:
            for node_id in list(self.known.verdicts):
                node = by_id.get(node_id)
                # A node that left or went down is validated again when it is back: its
                # engine may have been reconfigured meanwhile.
                if node is None or node.state != "ready":
                    del self.known.verdicts[node_id]
            for gone in set(self.health) - present:
                del self.health[gone]
            for gone in set(self.up) - present:
                del self.up[gone]
            for gone in set(self.roce) - present:
                del self.roce[gone]
            for gone in set(self._parsed) - present:
                del self._parsed[gone]
            for gone in set(self.files) - present:
                del self.files[gone]
                self._asked.pop(gone, None)
        self.reader.forget(present)
        for node in due:
            answer = answers[node.id]
            host = node.hostname or node.id
            if answer.document is None:
                # Asked: a node whose agent is down is not asked again every step.
                self._asked[node.id] = asked.get(node.id, ())
                reading = agents.unreachable(node, answer.error, now)
                if self.up.get(node.id, (host, False))[1]:
                    log.warning("node agent unreachable", node=host, error=answer.error)
                with self._lock:
                    self.up[node.id] = (host, False)
                    self.health[node.id] = reading
                    self.since = npusmi.unhealthy_since(self.since, reading)
                continue
            verdict, reading, links = self._parse(node, answer.document, now)
            said = self.known.verdicts.get(node.id)
            found = answer.document.get("paths") or {}
            files = {
                path: hostfiles.PathCheck.from_answer(found[path])
                for path in asked.get(node.id, ())
                if isinstance(found.get(path), dict)
            }
            with self._lock:
                self._read_at[node.id] = now_s
                self._asked[node.id] = asked.get(node.id, ())
                self.files[node.id] = files
                self.up[node.id] = (host, True)
                self.known.verdicts[node.id] = verdict
                said_roce = roce.problem(host, self.roce.get(node.id))
                self.roce[node.id] = links
                if self.settings.npu_health:
                    previous = self.health.get(node.id)
                    self.health[node.id] = reading
                    self.since = npusmi.unhealthy_since(self.since, reading, previous)
            if said is None or said.summary() != verdict.summary():
                log.info("node validated", node=host, ok=verdict.ok, verdict=verdict.summary())
            if roce.problem(host, links) != said_roce:
                log.info("roce links", node=host, problem=roce.problem(host, links) or "none")

    def _parse(
        self, node: NodeInfo, document: dict[str, Any], now: datetime
    ) -> tuple[Verdict, NodeHealth, dict[int, roce.RoceLink] | None]:
        """The verdict, NPU readings and RoCE links of one answer. An agent that answered
        304 gives back the very document of its last answer: judged again only with the new
        time (at 1,000 nodes, parsing every unchanged npu-smi table each reading was a tenth
        of a steady fleet's operator CPU)."""
        last = self._parsed.get(node.id)
        if last is not None and last.document is document and last.node == node:
            return (
                replace(last.verdict, checked_at=now),
                replace(last.reading, read_at=now),
                last.links,
            )
        verdict = agents.verdict(node, document, now)
        reading = agents.health(node, document, now, self.fault_table)
        links = roce.links(document)
        self._parsed[node.id] = _Parsed(document, node, verdict, reading, links)
        return verdict, reading, links

    def _ensure_agents(self, nodes: Sequence[NodeInfo], snapshot: SwarmSnapshot) -> None:
        """Node labels, the agents' secrets and one service per NPU set: written only when
        something differs, listed only when the NPU sets change or every REPAIR_SECONDS."""
        swarm, settings, instance = self.swarm, self.settings, self.settings.instance
        self._write_labels(nodes, snapshot)
        sets = agents.wanted_sets(nodes)
        roots = settings.tenant_policy().allowed_host_paths
        key = json.dumps([sets, settings.agent_image, settings.agent_port, roots])
        now_s = time.monotonic()
        ensured = self._ensured
        if ensured is not None and ensured[0] == key and now_s - ensured[1] < REPAIR_SECONDS:
            return
        assert self.credentials is not None
        observed = [
            ObservedSecret(str(s["ID"]), str(s["Spec"]["Name"]), dict(s["Spec"].get("Labels", {})))
            for s in swarm.secrets_labelled(f"{agents.AGENT}={instance}")
        ]
        secrets = agents.plan_secrets(observed, self.credentials, instance, self.clock())
        ids = {s.name: s.id for s in observed}
        for new in secrets.create:
            ids[new.name] = swarm.create_secret(new.name, new.data, new.labels)
        mounts = [SecretMount(m.name, m.file, ids[m.name]) for m in secrets.mounts]
        wanted = {
            npu_set: agents.agent_spec(
                npu_set,
                settings.agent_image,
                instance,
                settings.agent_port,
                settings.npu_health_seconds,
                mounts,
                settings.node_recheck_failed_seconds,
                roots,
            )
            for npu_set in sets
        }
        observed_services = swarm.services_labelled(f"{agents.AGENT}={instance}")
        for write in agents.agent_writes(wanted, observed_services):
            if write.kind == "create":
                swarm.create_service(write.spec)
            elif write.kind == "update":
                swarm.update_service(write.service_id, write.version, write.spec)
            else:
                swarm.remove_service(write.service_id)
            self._settle_from = time.monotonic()
            log.info("node agent service written", kind=write.kind, service=write.name)
        for stale in secrets.stale:
            try:
                swarm.remove_secret(stale.id)
            except SwarmRejected as error:  # still mounted by a task being replaced
                log.info("agent secret kept for now", secret=stale.name, error=str(error))
        self._ensured = (key, now_s)

    def _write_labels(self, nodes: Sequence[NodeInfo], snapshot: SwarmSnapshot) -> None:
        """Each NPU node's label for its agent, NPUSWARM_WRITE_CONCURRENCY at a time: a
        fleet's first start labels every node (two manager calls each), and one at a time
        that took most of a minute at 1,000 nodes."""
        wanted = agents.label_writes(nodes)
        # A label written since this snapshot was observed is not written again: the node
        # event of a label write asks for no pass (runtime/swarm_watch.py), so the next
        # snapshot may be a resync away. A newer snapshot tells again.
        if self._labelled_in is not snapshot:
            self._labelled, self._labelled_in = {}, snapshot
        writes = {n: v for n, v in wanted.items() if self._labelled.get(n) != v}
        if not writes:
            return

        def write(node_id: str, value: str) -> bool:
            try:
                self.swarm.set_node_label(node_id, agents.NODE_LABEL, value)
            except (SwarmRejected, SwarmUnavailable) as error:
                log.warning("node label refused", node=node_id, error=str(error))
                return False
            log.info("node labelled for its agent", node=node_id, npus=value)
            self._labelled[node_id] = value
            return True

        workers = max(1, min(self.settings.write_concurrency, len(writes)))
        with ThreadPoolExecutor(workers, thread_name_prefix="node-label") as pool:
            written = list(pool.map(write, writes.keys(), writes.values()))
        if any(written):
            self._settle_from = time.monotonic()

    def _remove_stale(self) -> None:
        """Probe services of earlier versions (one-shot validation and npu-smi readings)."""
        instance = self.settings.instance
        for key in (node_checks.CHECK, npusmi.READING):
            for service in self.swarm.services_labelled(f"{key}={instance}"):
                self.swarm.remove_service(service["ID"])
                log.info("stale probe removed", service=service.get("Spec", {}).get("Name"))

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()


def faults_isolating_nodes(health: Mapping[str, NodeHealth]) -> dict[str, str]:
    """Nodes whose NPU faults are graded SeparateNode -> why: no new replica there."""
    isolated: dict[str, str] = {}
    for node_id, reading in health.items():
        graded = [
            f"NPU {npu} {found.fault.describe()}"
            for npu, found in sorted(reading.npus.items())
            if found.fault is not None and found.fault.action == "node"
        ]
        if graded and not reading.error:
            isolated[node_id] = f"node {reading.hostname} is isolated ({'; '.join(graded)})"
    return isolated


def held_npus(snapshot: SwarmSnapshot) -> dict[str, set[int]]:
    """NPUs this installation's replicas hold, per node."""
    held: dict[str, set[int]] = {}
    for allocation in snapshot.allocations():
        if not allocation.foreign:
            held.setdefault(allocation.node_id, set()).update(allocation.npus)
    return held


def publish_verdicts(checker: NodeChecker | None) -> None:
    """npuswarm_node_validation, the NPU gauges and npuswarm_node_agent_up read this checker
    (None: no series)."""

    def checks() -> list[tuple[str, str, bool]]:
        assert checker is not None
        return [
            (verdict.hostname, check.name, check.ok)
            for verdict in sorted(checker.verdicts().values(), key=lambda v: v.hostname)
            for check in verdict.checks
        ]

    metrics.node_validation.source = checks if checker is not None else None
    metrics.npu_health.source = checker.npu_report if checker is not None else None
    metrics.node_agent_up.source = checker.agents_up if checker is not None else None
