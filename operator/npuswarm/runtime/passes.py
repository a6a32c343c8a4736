"""The pass loop: an asyncio task in kopf's loop that serves every trigger with one pass at a
time (the pass itself runs in a thread), only while this instance leads; between passes it
waits for a trigger, the resync, or the end of an outage's backoff."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import structlog

from npuswarm import metrics
from npuswarm.core.clock import utcnow
from npuswarm.core.pipeline import Desired
from npuswarm.core.relocation import FailureTracker
from npuswarm.core.status import unavailable_status
from npuswarm.reconcile import NodeChecks, PassResult, Reconciler
from npuswarm.runtime import heap
from npuswarm.runtime.autoscaler import Autoscaler
from npuswarm.runtime.index import IndexGate, IndexReader
from npuswarm.runtime.leadership import LeadershipWatch
from npuswarm.runtime.node_checks import NodeCheckLoop
from npuswarm.runtime.publisher import StatusPublisher
from npuswarm.runtime.swarm_watch import SwarmWatch
from npuswarm.runtime.triggers import Triggers
from npuswarm.settings import Settings
from npuswarm.swarm import LeaseLapsed, SwarmUnavailable

log = structlog.get_logger("npuswarm.runtime")

# Triggers that arrive within this window are served by one pass.
COALESCE_SECONDS = 0.1
MAX_BACKOFF_SECONDS = 300.0
# Services that look orphaned while the API server cannot confirm it: asked again this soon.
ORPHAN_RETRY_SECONDS = 10.0
# Until kopf's indexes are complete (IndexGate), asked again this often.
INDEX_RETRY_SECONDS = 1.0
# A pass with this many Swarm and status writes made a burst of garbage worth giving back
# (runtime/heap.py).
RELEASE_AFTER_WRITES = 100


class PassLoop:
    def __init__(
        self,
        settings: Settings,
        reconciler: Reconciler,
        triggers: Triggers,
        reader: IndexReader,
        publisher: StatusPublisher,
        leadership: LeadershipWatch,
        gate: IndexGate | None = None,
    ) -> None:
        self.settings = settings
        self.reconciler = reconciler
        self.triggers = triggers
        self.reader = reader
        self.publisher = publisher
        self.leadership = leadership
        self.gate = gate or IndexGate(None)
        # Replicas failing over and over where they are (core/relocation.py).
        self.failing = FailureTracker(settings.relocation_rules(), reconciler.clock)
        # Set when the watches run (Runtime.start): they learn what each pass saw.
        self.swarm_watch: SwarmWatch | None = None
        self.node_checks: NodeCheckLoop | None = None
        # The built-in autoscaler: its counts go into every pass, it learns each plan.
        self.autoscaler: Autoscaler | None = None
        self.sequence = 0
        self.last_metrics: metrics.PassMetrics | None = None
        self.settled_at = time.monotonic()  # the heap's last heap.settle()
        self.trimmed_at = time.monotonic()  # and its last heap.trim() (a settle trims too)

    async def run(self) -> None:
        triggers = self.triggers
        last_pass = 0.0
        while not triggers.stop.is_set():
            try:
                since = time.monotonic() - last_pass
                if triggers.failures:
                    # An outage: triggers do not cut the backoff short; Swarm answering
                    # again (the ping) does.
                    backoff = min(MAX_BACKOFF_SECONDS, 5.0 * 2 ** (triggers.failures - 1))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(triggers.recovery.wait(), max(0.0, backoff - since))
                    triggers.recovery.clear()
                    triggers.everything = True
                else:
                    try:
                        delay = max(0.0, self.settings.resync_seconds - since)
                        await asyncio.wait_for(triggers.wake.wait(), timeout=delay)
                    except TimeoutError:
                        triggers.everything = True
                await asyncio.sleep(COALESCE_SECONDS)
                triggers.wake.clear()
                if not self.leadership.leader:
                    continue  # another instance acts; triggers are kept for when we lead
                if not self.gate.complete and not await self._indexes_complete():
                    continue  # triggers are kept for the first pass on complete indexes
                served, everything = triggers.take()
                last_pass = time.monotonic()
                await self.one_pass(served, everything)
            except asyncio.CancelledError:
                raise
            except Exception:
                metrics.background_errors_total.labels("pass").inc()
                log.exception("pass loop error; continuing")
                triggers.failures += 1

    async def _indexes_complete(self) -> bool:
        started = time.monotonic()
        listed = await asyncio.to_thread(self.gate.list_all)
        if self.gate.check(self.reader, listed):
            log.info(
                "indexes complete",
                deployments=len(self.reader.index),
                gateways=len(self.reader.gateway_index),
                check_seconds=round(time.monotonic() - started, 3),
            )
            return True
        self.triggers.request_later(INDEX_RETRY_SECONDS, [None])
        return False

    async def one_pass(self, served: set[str], everything: bool) -> None:
        publisher = self.publisher
        desired = self.reader.desired(publisher.written, publisher.gateways_written)
        if self.autoscaler is not None:
            desired = self.autoscaler.serve(desired)
        if everything:
            served = desired.known()
        self.sequence += 1
        pass_id = uuid.uuid4().hex[:12]
        started = time.monotonic()
        with structlog.contextvars.bound_contextvars(reconcile_id=pass_id):
            try:
                checker = self.node_checks.checker if self.node_checks is not None else None
                checks: NodeChecks | None = checker.unusable if checker is not None else None
                checks = self.failing.checks(checks)
                result = await asyncio.to_thread(self.reconciler.run_pass, desired, checks)
            except SwarmUnavailable as error:
                await self._outage(desired, served, str(error), time.monotonic() - started)
                return
            except LeaseLapsed as error:
                # No longer sure it leads: the writes stop here; whoever leads next serves
                # these triggers (this instance too, once its lease is confirmed again).
                metrics.passes_total.labels("fenced").inc()
                log.warning("pass stopped: leadership lease not held", error=str(error))
                self.triggers.request(everything=True)
                return
            self.triggers.failures = 0
            elapsed = time.monotonic() - started
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
                **{f"{phase}_seconds": seconds for phase, seconds in result.timings.items()},
            )
        if result.plan.unconfirmed_orphans:
            self.triggers.request_later(ORPHAN_RETRY_SECONDS, [None])
        burst = result.writes + len(publisher.last_changed) >= RELEASE_AFTER_WRITES
        if burst or time.monotonic() - self.settled_at >= heap.SETTLE_SECONDS:
            await asyncio.to_thread(heap.settle)
            self.settled_at = self.trimmed_at = time.monotonic()
        elif time.monotonic() - self.trimmed_at >= heap.TRIM_SECONDS:
            await asyncio.to_thread(heap.trim)
            self.trimmed_at = time.monotonic()
        self._count(result, served, pass_id, total)

    def _count(self, result: PassResult, served: set[str], pass_id: str, total: float) -> None:
        metrics.passes_total.labels("success").inc()
        metrics.pass_duration_seconds.observe(total)
        for phase, seconds in result.timings.items():
            metrics.pass_phase_seconds.labels(phase).observe(seconds)
        metrics.pass_writes_total.inc(result.writes)
        metrics.orphans_removed_total.inc(len(result.orphans_removed))
        # Served: the deployments that asked, and any the pass wrote or changed the status of
        # (a pass triggered by someone else may be the one that places a new deployment).
        last_changed = self.publisher.last_changed
        changed = {key for key, view in result.views.items() if view.applied}
        for key in served | changed | last_changed:
            view = result.views.get(key)
            if view is None:
                continue
            label = "requeue_after" if view.requeue else "success"
            metrics.reconcile_total.labels(metrics.CONTROLLER, label).inc()
            metrics.reconcile_time_seconds.labels(metrics.CONTROLLER).observe(total)
            if view.applied or key in last_changed:
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

    async def _publish(
        self, result: PassResult, desired: Desired, served: set[str], everything: bool
    ) -> None:
        if self.swarm_watch is not None:
            self.swarm_watch.saw_pass(result)
        if self.autoscaler is not None:
            self.autoscaler.saw_pass(result.plan)
        busy = result.requeue or any(g.readyReplicas < g.replicas for g in result.gateways.values())
        if self.swarm_watch is not None:
            self.swarm_watch.set_busy(busy)
        statuses = {key: view.status for key, view in result.views.items()}
        await self.publisher.write_statuses(
            statuses, desired, resync=everything, gateways=result.gateways
        )
        await self.publisher.post_events(result.views, self.reader.uids(desired))
        self._gauges(result, served)

    def _gauges(self, result: PassResult, served: set[str]) -> None:
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
        self.triggers.failures += 1
        metrics.passes_total.labels("error").inc()
        for _ in served:
            metrics.reconcile_total.labels(metrics.CONTROLLER, "error").inc()
            metrics.reconcile_errors_total.labels(metrics.CONTROLLER).inc()
            metrics.reconcile_time_seconds.labels(metrics.CONTROLLER).observe(elapsed)
        log.warning("swarm unavailable", error=message, failures=self.triggers.failures)
        now = utcnow()
        statuses = {
            md.key: unavailable_status(
                md.metadata.generation, message, desired.previous.get(md.key, {}), now
            )
            for md in desired.deployments
        }
        await self.publisher.write_statuses(statuses, desired, resync=False)
