"""The operator's running state (kept in kopf's memo): the pass loop that serves every trigger,
and the background loops that watch Swarm (events, a cheap task poll, reachability) and
leadership. Every loop survives any exception and counts it in
npuswarm_background_errors_total{loop}.

Triggers only mark deployments as wanting a pass; triggers that arrive together are served by
one pass. The periodic resync is the safety net.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from pydantic import ValidationError

from npuswarm import metrics
from npuswarm.api import deployment as deployment_api
from npuswarm.api import gateway as gateway_api
from npuswarm.api.deployment import ModelDeployment
from npuswarm.api.gateway import ModelGatewayStatus
from npuswarm.api.meta import Indexed, Stamp, split_key, stamp, validation_message, walk_index
from npuswarm.core import hostpolicy
from npuswarm.core.clock import utcnow
from npuswarm.core.kube_events import Event, EventFilter
from npuswarm.core.relocation import FailureTracker
from npuswarm.core.status import unavailable_status
from npuswarm.gateway.backends import parse_gateways
from npuswarm.kube import Kube
from npuswarm.nodehealth.runner import NodeChecker, publish_verdicts
from npuswarm.peering import is_active
from npuswarm.reconcile import Desired, NodeChecks, PassResult, Reconciler
from npuswarm.settings import Settings
from npuswarm.swarm import Swarm, SwarmUnavailable, stream_errors

log = structlog.get_logger("npuswarm.runtime")

# Triggers that arrive within this window are served by one pass.
COALESCE_SECONDS = 0.1
MAX_BACKOFF_SECONDS = 300.0
STATUS_WRITERS = 8
STATUS_RETRY_SECONDS = 3.0
# How often the peering object is read: a standby takes over at most this long after the
# dead leader's record expires (one small GET per poll).
LEADERSHIP_POLL_SECONDS = 2.0
# Services that look orphaned while the API server cannot confirm it: asked again this soon.
ORPHAN_RETRY_SECONDS = 10.0
# A pass with this many Swarm and status writes made a burst of garbage worth giving back.
RELEASE_AFTER_WRITES = 100
# A Swarm event about a service this operator wrote so recently is its own echo.
ECHO_SECONDS = 5.0


@dataclass
class Parsed:
    """kopf's index entry of one ModelDeployment, parsed once per generation."""

    stamp: Stamp
    model: ModelDeployment | None
    problem: str | None
    reason: str = "InvalidSpec"


@dataclass
class Leadership:
    standalone: bool
    mandatory: bool
    name: str
    priority: int
    identity: str
    namespaces: frozenset[str] | None


@dataclass
class Runtime:
    settings: Settings
    reconciler: Reconciler
    kube: Kube
    leadership: Leadership
    # kopf's index of ModelDeployments: (namespace, name) -> store of index values.
    index: Mapping[Any, Any] = field(default_factory=dict)
    # kopf's index of ModelGateways, and the gateway statuses this operator last wrote.
    gateway_index: Mapping[Any, Any] = field(default_factory=dict)
    gateways_written: dict[str, dict[str, Any]] = field(default_factory=dict)
    loop: asyncio.AbstractEventLoop | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    recovery: asyncio.Event = field(default_factory=asyncio.Event)
    dirty: set[str] = field(default_factory=set)
    everything: bool = True  # the first pass serves every deployment
    leader: bool = False
    busy: bool = False  # the last pass left work under way: poll tasks faster
    stop: threading.Event = field(default_factory=threading.Event)
    events: EventFilter = field(default_factory=EventFilter)
    written: dict[str, dict[str, Any]] = field(default_factory=dict)
    parsed: dict[str, Parsed] = field(default_factory=dict)
    # The (uid, generation, deletionTimestamp) each deployment was last seen with.
    generations: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    owner_of_service: dict[str, str] = field(default_factory=dict)  # service id -> owner
    tasks_seen: dict[str, str] = field(default_factory=dict)  # task id -> state, last pass
    service_of_task: dict[str, str] = field(default_factory=dict)  # task id -> service id
    recent_writes: dict[str, float] = field(default_factory=dict)  # service name -> monotonic
    sequence: int = 0
    failures: int = 0
    last_changed: set[str] = field(default_factory=set)  # statuses written by the last pass
    last_metrics: metrics.PassMetrics | None = None
    event_stream: Any = None  # the open Swarm event stream: closing it ends its thread
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    # Node checks (nodehealth/runner.py); made by start_threads when NPUSWARM_NODE_VALIDATION is on.
    checker: NodeChecker | None = None
    # Replicas failing over and over where they are (failing.py); made by start_threads.
    failing: FailureTracker | None = None
    # (nodeSelector, image) of every deployment, oldest first, as of the last pass.
    wanted: list[tuple[dict[str, str], str]] = field(default_factory=list)

    # -- triggers -------------------------------------------------------------------------

    def request(
        self, key: str | None = None, *, everything: bool = False, recovered: bool = False
    ) -> None:
        """Ask for a pass (in the event loop's thread). ``key``: the deployment that wants
        it; ``everything``: serve every deployment (resync, node change); ``recovered``:
        Swarm answers again, so the outage backoff ends."""
        if recovered:
            self.failures = 0
            self.recovery.set()
        if everything:
            self.everything = True
        elif key is not None:
            self.dirty.add(key)
        metrics.workqueue_depth.labels(metrics.CONTROLLER).set(len(self.dirty))
        self.wake.set()

    def request_threadsafe(
        self, key: str | None = None, *, everything: bool = False, recovered: bool = False
    ) -> None:
        if self.loop is not None and not self.stop.is_set():
            self.loop.call_soon_threadsafe(
                lambda: self.request(key, everything=everything, recovered=recovered)
            )

    # -- the pass loop --------------------------------------------------------------------

    async def run_passes(self) -> None:
        last_pass = 0.0
        while not self.stop.is_set():
            try:
                since = time.monotonic() - last_pass
                if self.failures:
                    # An outage: triggers do not cut the backoff short; Swarm answering
                    # again (the probe) does.
                    backoff = min(MAX_BACKOFF_SECONDS, 5.0 * 2 ** (self.failures - 1))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.recovery.wait(), max(0.0, backoff - since))
                    self.recovery.clear()
                    self.everything = True
                else:
                    try:
                        delay = max(0.0, self.settings.resync_seconds - since)
                        await asyncio.wait_for(self.wake.wait(), timeout=delay)
                    except TimeoutError:
                        self.everything = True
                await asyncio.sleep(COALESCE_SECONDS)
                self.wake.clear()
                if not self.leader:
                    continue  # another instance acts; triggers are kept for when we lead
                served, everything = set(self.dirty), self.everything
                self.dirty.clear()
                self.everything = False
                metrics.workqueue_depth.labels(metrics.CONTROLLER).set(0)
                last_pass = time.monotonic()
                await self.one_pass(served, everything)
            except asyncio.CancelledError:
                raise
            except Exception:
                metrics.background_errors_total.labels("pass").inc()
                log.exception("pass loop error; continuing")
                self.failures += 1

    async def one_pass(self, served: set[str], everything: bool) -> None:
        desired = self.desired()
        if everything:
            served = desired.known()
        self.sequence += 1
        pass_id = uuid.uuid4().hex[:12]
        started = time.monotonic()
        with structlog.contextvars.bound_contextvars(reconcile_id=pass_id):
            try:
                checks: NodeChecks | None = (
                    self.checker.unusable if self.checker is not None else None
                )
                if self.failing is not None:
                    checks = self.failing.checks(checks)
                result = await asyncio.to_thread(self.reconciler.run_pass, desired, checks)
            except SwarmUnavailable as error:
                await self._outage(desired, served, str(error), time.monotonic() - started)
                return
            self.failures = 0
            elapsed = time.monotonic() - started
            if self.failing is not None:
                for key, events in self.failing.events().items():
                    if key in result.views:
                        result.views[key].events.extend(events)
            await self._publish(result, desired, served, everything)
            total = time.monotonic() - started
            log.info(
                "pass",
                deployments=len(desired.deployments),
                served=len(served),
                writes=result.writes,
                orphans_removed=len(result.orphans_removed),
                swarm_seconds=round(elapsed, 3),
                duration_seconds=round(total, 3),
            )
        if result.plan.unconfirmed_orphans:
            assert self.loop is not None
            self.loop.call_later(ORPHAN_RETRY_SECONDS, self.request, None)
        if result.writes + len(self.last_changed) >= RELEASE_AFTER_WRITES:
            await asyncio.to_thread(_release_memory)
        metrics.passes_total.labels("success").inc()
        metrics.pass_duration_seconds.observe(total)
        metrics.pass_writes_total.inc(result.writes)
        metrics.orphans_removed_total.inc(len(result.orphans_removed))
        # Served: the deployments that asked, and any the pass wrote or changed the status of
        # (a pass triggered by someone else may be the one that places a new deployment).
        changed = {key for key, view in result.views.items() if view.applied}
        for key in served | changed | self.last_changed:
            view = result.views.get(key)
            if view is None:
                continue
            label = "requeue_after" if view.requeue else "success"
            metrics.reconcile_total.labels(metrics.CONTROLLER, label).inc()
            metrics.reconcile_time_seconds.labels(metrics.CONTROLLER).observe(total)
            if view.applied or key in self.last_changed:
                # Only deployments the pass changed something for: a resync of a quiet fleet
                # logs one "pass" line, not one per deployment.
                log.info(
                    "reconciled",
                    deployment=key,
                    reconcile_id=pass_id,
                    result=label,
                    phase=view.status.phase,
                    writes=len(view.applied),
                    duration_seconds=round(total, 3),
                )

    def desired(self) -> Desired:
        """Every ModelDeployment kopf's index knows, parsed once per generation."""
        deployments: list[ModelDeployment] = []
        invalid: dict[str, tuple[int, str, str]] = {}
        deleting: set[str] = set()
        previous: dict[str, dict[str, Any]] = {}
        seen: set[str] = set()
        for entry in walk_index(self.index, self.written):
            key, metadata = entry.key, entry.metadata
            seen.add(key)
            previous[key] = entry.previous
            parsed = self._parse(entry)
            if metadata.get("deletionTimestamp"):
                deleting.add(key)
            elif parsed.model is None:
                invalid[key] = (parsed.stamp[1], parsed.reason, parsed.problem or "")
            else:
                deployments.append(parsed.model)
        for gone in set(self.parsed) - seen:
            del self.parsed[gone]
        gateways, gateway_previous = parse_gateways(self.gateway_index, self.gateways_written)
        return Desired(
            deployments=deployments,
            invalid=invalid,
            deleting=frozenset(deleting),
            previous=previous,
            namespaces=self.leadership.namespaces,
            gateways=gateways,
            gateway_previous=gateway_previous,
        )

    def _parse(self, entry: Indexed) -> Parsed:
        key, seen = entry.key, stamp(entry.metadata)
        cached = self.parsed.get(key)
        if cached is not None and cached.stamp == seen:
            return cached
        try:
            model = ModelDeployment.model_validate(
                {"metadata": dict(entry.metadata), "spec": dict(entry.spec)}
            )
        except ValidationError as error:
            parsed = Parsed(seen, None, validation_message(error))
        else:
            # Host safety: what the API server accepted may still reach past the operator's
            # settings (a hostPath outside the allow-list).
            refused = hostpolicy.violations(model, self.settings.tenant_policy())
            parsed = (
                Parsed(seen, None, "; ".join(refused), hostpolicy.REASON)
                if refused
                else Parsed(seen, model, None)
            )
        self.parsed[key] = parsed
        return parsed

    async def _publish(
        self, result: PassResult, desired: Desired, served: set[str], everything: bool
    ) -> None:
        for action in result.all_applied():
            self.recent_writes[action.service_name] = time.monotonic()
        self.owner_of_service = {s.id: s.deployment for s in result.plan.snapshot.services}
        if self.checker is not None:
            # For node probes (another thread): swapped whole, never edited in place.
            self.wanted = [
                (md.spec.nodeSelector, md.spec.image)
                for md in sorted(desired.deployments, key=_age)
            ]
        self.busy = result.requeue or any(
            g.readyReplicas < g.replicas for g in result.gateways.values()
        )
        statuses = {key: view.status for key, view in result.views.items()}
        await self._write_statuses(statuses, desired, resync=everything, gateways=result.gateways)
        await self._post_events(result.views, self.uids(desired))
        now = time.time()
        deployments = {
            key: metrics.DeploymentMetrics(
                phase=view.status.phase,
                desired=view.status.replicas,
                placed=view.status.placedReplicas,
                ready=view.status.readyReplicas,
                unplaced=view.unplaced_reasons,
                served_at=now if key in served else self._served_at(key, now),
            )
            for key, view in result.views.items()
        }
        self.last_metrics = metrics.PassMetrics(
            sequence=self.sequence, npus=result.npu_states(), deployments=deployments
        )
        metrics.pass_gauges.publish(self.last_metrics)

    def _retry(self, keys: list[str]) -> None:
        for key in keys:
            self.request(key)

    def uids(self, desired: Desired) -> dict[str, str]:
        found = {md.key: md.metadata.uid for md in desired.deployments}
        for key in desired.invalid:
            parsed = self.parsed.get(key)
            if parsed is not None:
                found[key] = parsed.stamp[0]
        return found

    def _served_at(self, key: str, default: float) -> float:
        last = self.last_metrics
        if last is not None and key in last.deployments:
            served_at: float = last.deployments[key].served_at
            return served_at
        return default

    async def _outage(
        self, desired: Desired, served: set[str], message: str, elapsed: float
    ) -> None:
        """Swarm could not be read or written: say so in every status, remove nothing,
        back off."""
        self.failures += 1
        metrics.passes_total.labels("error").inc()
        for _ in served:
            metrics.reconcile_total.labels(metrics.CONTROLLER, "error").inc()
            metrics.reconcile_errors_total.labels(metrics.CONTROLLER).inc()
            metrics.reconcile_time_seconds.labels(metrics.CONTROLLER).observe(elapsed)
        log.warning("swarm unavailable", error=message, failures=self.failures)
        now = utcnow()
        statuses = {
            md.key: unavailable_status(
                md.metadata.generation, message, desired.previous.get(md.key, {}), now
            )
            for md in desired.deployments
        }
        await self._write_statuses(statuses, desired, resync=False)

    async def _write_statuses(
        self,
        statuses: Mapping[str, deployment_api.ModelDeploymentStatus],
        desired: Desired,
        resync: bool,
        gateways: Mapping[str, ModelGatewayStatus] | None = None,
    ) -> None:
        """Write the statuses that changed, and only those, a few at a time; ModelGateways'
        the same way. A refused write asks for a pass in a few seconds."""
        changed, failed = await self._patch_changed(
            statuses, desired.previous, self.written, deployment_api.PLURAL, resync
        )
        self.last_changed = changed
        if gateways:
            _, refused = await self._patch_changed(
                gateways,
                desired.gateway_previous,
                self.gateways_written,
                gateway_api.PLURAL,
                resync,
            )
            failed += refused
        if failed:
            # e.g. the API server throttling (429) while kopf adds finalizers to a fleet:
            # these statuses are retried by a pass in a few seconds, not at the resync.
            assert self.loop is not None
            self.loop.call_later(STATUS_RETRY_SECONDS, self._retry, failed)

    async def _patch_changed(
        self,
        statuses: Mapping[str, deployment_api.ModelDeploymentStatus | ModelGatewayStatus],
        previous: Mapping[str, dict[str, Any]],
        written: dict[str, dict[str, Any]],
        plural: str,
        resync: bool,
    ) -> tuple[set[str], list[str]]:
        """(changed, failed): PATCH each status that differs from what the object has. A
        resync compares with what the API server has (heals a lost write); other passes with
        what this operator last wrote (the index may still lag behind it)."""
        changed: list[tuple[str, dict[str, Any]]] = []
        for key, status in statuses.items():
            patch = status_patch(status)
            before = previous.get(key) if resync else written.get(key)
            if before is None:
                before = previous.get(key)
            if not _same_status(before or {}, patch):
                changed.append((key, patch))
        limit = asyncio.Semaphore(STATUS_WRITERS)
        failed: list[str] = []

        async def write(key: str, patch: dict[str, Any]) -> None:
            namespace, name = split_key(key)
            async with limit:
                try:
                    found = await asyncio.to_thread(
                        self.kube.patch_status, namespace, name, patch, plural
                    )
                except Exception as error:  # a pass soon writes it again
                    metrics.kube_api_errors_total.labels("status").inc()
                    log.warning(
                        "status write failed", object=f"{plural}/{key}", error=_short(error)
                    )
                    written.pop(key, None)
                    failed.append(key)
                    return
            if found:
                written[key] = {k: v for k, v in patch.items() if v is not None}
            else:
                written.pop(key, None)

        await asyncio.gather(*(write(key, patch) for key, patch in changed))
        return {key for key, _ in changed}, failed

    async def _post_events(self, views: Mapping[str, Any], uids: Mapping[str, str]) -> None:
        """New events only (an identical one is let through once an hour), a few at a time."""
        limit = asyncio.Semaphore(STATUS_WRITERS)

        async def post(key: str, event: Event) -> None:
            namespace, name = split_key(key)
            reference = {"namespace": namespace, "name": name, "uid": uids.get(key, "")}
            async with limit:
                try:
                    await asyncio.to_thread(
                        self.kube.post_event, reference, event.type, event.reason, event.message
                    )
                except Exception as error:
                    metrics.kube_api_errors_total.labels("event").inc()
                    log.warning("event not posted", deployment=key, error=str(error))

        await asyncio.gather(
            *(
                post(key, event)
                for key, view in views.items()
                for event in view.events
                if self.events.admit(key, event)
            )
        )

    def forget(self, key: str) -> None:
        self.written.pop(key, None)
        self.generations.pop(key, None)
        self.parsed.pop(key, None)
        self.events.forget(key)

    # -- background loops (threads: they block on Docker and the API server) -------------

    def start_threads(self) -> None:
        loops: list[tuple[str, Callable[[], None]]] = [
            ("events", self._follow_events),
            ("task-poll", self._poll_tasks),
            ("swarm-probe", self._probe_swarm),
            ("leadership", self._watch_leadership),
        ]
        self.failing = FailureTracker(self.settings.relocation_rules(), self.reconciler.clock)
        if self.settings.node_validation and isinstance(self.reconciler.swarm, Swarm):
            self.checker = NodeChecker(
                self.reconciler.swarm,
                self.settings,
                self.reconciler.lock,
                lambda: self.reconciler.last_plan,
            )
            publish_verdicts(self.checker)
            loops.append(("node-check", self._check_nodes))
        for name, target in loops:
            thread = threading.Thread(target=_survive(name, target, self.stop), name=name)
            thread.daemon = True
            thread.start()
            self.threads.append(thread)

    def _follow_events(self) -> None:
        """Swarm's service and node events start a pass within about a second."""
        swarm = self.reconciler.swarm
        assert isinstance(swarm, Swarm)
        stream = swarm.event_stream()
        self.event_stream = stream
        try:
            # A pass right after (re)connecting covers whatever happened while disconnected.
            self.request_threadsafe(everything=True)
            for event in stream:
                if self.stop.is_set():
                    return
                self._on_swarm_event(event)
        except stream_errors as error:
            raise SwarmUnavailable(f"event stream: {error}") from error
        finally:
            stream.close()

    def _on_swarm_event(self, event: Mapping[str, Any]) -> None:
        if event.get("Type") == "node":
            self.request_threadsafe(everything=True)
            return
        actor = event.get("Actor") or {}
        name = (actor.get("Attributes") or {}).get("name", "")
        written = self.recent_writes.get(name)
        if written is not None and time.monotonic() - written < ECHO_SECONDS:
            return
        self.request_threadsafe(self.owner_of_service.get(actor.get("ID", "")))

    def _poll_tasks(self) -> None:
        """Docker's event stream has no task events: a cheap list of the tasks Swarm wants
        running notices a task failing or becoming ready, faster while work is under way.
        npuswarm's tasks are compared with what the last pass saw (a change a pass has not
        seen yet asks for one); others' with the previous poll (a foreign task moving may move
        the NPUs it holds)."""
        swarm = self.reconciler.swarm
        assert isinstance(swarm, Swarm)
        # Tasks of services the last pass did not know yet (it just created them) land here
        # too, so a new replica's first states also ask for a pass.
        foreign_before: dict[str, tuple[str, str]] = {}
        own_before: dict[str, str] = {}
        while not self.stop.is_set():
            settings = self.settings
            interval = settings.task_poll_busy_seconds if self.busy else settings.task_poll_seconds
            if self.stop.wait(interval):
                return
            if not self.leader:
                continue
            states = swarm.task_states()
            owners = self.owner_of_service
            own = {t: state for t, (service, state) in states.items() if service in owners}
            seen = self.tasks_seen
            # New to the last pass and to the previous poll: a difference that stays (a task
            # the pass cannot see the same way) asks once, not on every poll.
            unseen = [
                task
                for task in own.keys() | seen.keys()
                if own.get(task) != seen.get(task) and own.get(task) != own_before.get(task)
            ]
            for task in unseen:
                service = states[task][0] if task in states else self.service_of_task.get(task)
                self.request_threadsafe(owners.get(service or ""))
            if unseen:
                log.info("task states changed", tasks=len(unseen))
            own_before = own
            foreign = {t: v for t, v in states.items() if v[0] not in owners}
            if foreign != foreign_before:
                self.request_threadsafe(None)
            foreign_before = foreign

    def _check_nodes(self) -> None:
        """Node validation probes (docs/node-health.md): a verdict that changes asks for a
        pass, which places on a node that passed or stops placing on one that failed."""
        checker = self.checker
        assert checker is not None
        while not self.stop.is_set():
            if self.stop.wait(self.settings.task_poll_seconds):
                return
            if not self.leader:
                continue
            if checker.step(self.wanted):
                self.request_threadsafe(everything=True)

    def _probe_swarm(self) -> None:
        """Reachability goes into a metric, not liveness: restarting the operator would not
        bring Docker back, and a restart loop would hide the real problem."""
        swarm = self.reconciler.swarm
        assert isinstance(swarm, Swarm)
        while not self.stop.is_set():
            before = swarm.reachable
            reachable = swarm.ping()
            if before is not None and reachable != before:
                # Lost: a pass reports the outage in every status. Back: recover now rather
                # than at the end of the backoff.
                self.request_threadsafe(everything=True, recovered=reachable)
            if self.stop.wait(self.settings.swarm_probe_seconds):
                return

    def _watch_leadership(self) -> None:
        """npuswarm_leader, and the gate of every pass: by kopf's own peering rule, read from
        the cluster peering object, or each watched namespace's."""
        lead = self.leadership
        while not self.stop.is_set():
            active = lead.standalone or self._active()
            if active and not self.leader:
                self.request_threadsafe(everything=True)
            self.leader = active
            metrics.leader.set(1 if active else 0)
            if self.stop.wait(min(self.settings.swarm_probe_seconds, LEADERSHIP_POLL_SECONDS)):
                return

    def _active(self) -> bool:
        lead = self.leadership
        scopes: list[str | None] = [None]
        if lead.namespaces is not None:
            scopes = [*sorted(lead.namespaces)]
        now = utcnow()
        for scope in scopes:
            status = self.kube.peering_status(lead.name, scope)
            if status is None:
                # No peering object: kopf runs standalone, unless peering is mandatory.
                if lead.mandatory:
                    return False
                continue
            if not is_active(status, lead.identity, lead.priority, now):
                return False
        return True


def _survive(name: str, body: Callable[[], None], stop: threading.Event) -> Callable[[], None]:
    """Run ``body`` until ``stop``; any exception is counted, logged and retried with backoff."""

    def loop() -> None:
        failures = 0
        while not stop.is_set():
            started = time.monotonic()
            try:
                body()
            except Exception as error:
                metrics.background_errors_total.labels(name).inc()
                log.warning("background loop failed; retrying", loop=name, error=repr(error))
                failures = 0 if time.monotonic() - started > 60 else failures + 1
                stop.wait(min(30.0, 0.5 * 2**failures))
            else:
                if not stop.is_set():
                    stop.wait(1.0)

    return loop


def _age(md: ModelDeployment) -> tuple[str, str]:
    return (md.metadata.creationTimestamp or "~", md.key)


def _release_memory() -> None:
    """Give freed heap back to the OS after a burst (a fleet's first pass, a mass update):
    glibc keeps freed memory in its arenas, so the resident size would stay at the burst's
    peak for the operator's whole life. A no-op where malloc_trim does not exist."""
    libc = ctypes.util.find_library("c")
    if libc is None:
        return
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None)
    if trim is not None:
        gc.collect()
        trim(0)


def _short(error: Exception) -> str:
    """An API error's first line: a 429's headers and body say nothing more."""
    return str(error).splitlines()[0] if str(error) else repr(error)


def status_patch(
    status: deployment_api.ModelDeploymentStatus | ModelGatewayStatus,
) -> dict[str, Any]:
    """A merge patch: unset nested fields are left out, unset top-level ones are deleted."""
    patch: dict[str, Any] = status.model_dump(mode="json", exclude_none=True)
    for key, value in status.model_dump(mode="json").items():
        if value is None:
            patch[key] = None
    return patch


def _same_status(before: Mapping[str, Any], patch: Mapping[str, Any]) -> bool:
    return all(before.get(key) == value for key, value in patch.items())
