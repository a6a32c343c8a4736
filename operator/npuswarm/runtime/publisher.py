"""The status publisher: a pass's statuses and Events go to the API server, only those that
changed, written in the background (bounded, retried), so the next pass never waits on them.
It remembers what it handed over, since kopf's index lags behind the operator's own writes.

Off the pass's critical path (issue 22, item 6): at a fleet's start a pass may change 2,000
statuses while kopf adds its finalizers to the same objects and the API server throttles;
the pass loop used to wait for every PATCH before the next pass could serve the deployments
that reached the index meanwhile. Now a pass hands its statuses over and goes on; the newest
status of an object replaces an older one not yet written (one PATCH, never a stale one
after a newer one), a refused write is retried with backoff, and
``npuswarm_status_writes_pending`` shows the queue.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from npuswarm import metrics
from npuswarm.api import deployment as deployment_api
from npuswarm.api import gateway as gateway_api
from npuswarm.api.deployment import ModelDeploymentStatus
from npuswarm.api.gateway import ModelGatewayStatus
from npuswarm.api.meta import split_key
from npuswarm.core.kube_events import Event, EventFilter
from npuswarm.core.pipeline import DeploymentView, Desired

log = structlog.get_logger("npuswarm.runtime")

# PATCHes and Event POSTs in flight at once (blocking kubernetes-client calls, each on its
# own thread of the publisher's pool, not the event loop's default executor).
STATUS_WRITERS = 16
# A refused write is tried again after this, doubling up to STATUS_RETRY_MAX_SECONDS.
STATUS_RETRY_SECONDS = 3.0
STATUS_RETRY_MAX_SECONDS = 30.0


class StatusWriter(Protocol):
    """What the publisher needs of the API server (kube.Kube has it)."""

    def patch_status(
        self, namespace: str, name: str, patch: dict[str, Any], plural: str = ...
    ) -> bool: ...
    def post_event(
        self, reference: dict[str, str], type_: str, reason: str, message: str
    ) -> None: ...


# (plural, namespace/name): one object's status.
ObjectKey = tuple[str, str]


@dataclass(frozen=True)
class _EventPost:
    key: str
    reference: dict[str, str]
    event: Event


_Item = ObjectKey | _EventPost


@dataclass
class StatusPublisher:
    kube: StatusWriter
    # The statuses this operator last handed over, by namespace/name: deployments',
    # gateways'. Written or about to be: a refused one is retried until a newer replaces it.
    written: dict[str, dict[str, Any]] = field(default_factory=dict)
    gateways_written: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: EventFilter = field(default_factory=EventFilter)
    # The deployments whose status the last pass changed.
    last_changed: set[str] = field(default_factory=set)
    # The newest status not yet sent, per object; the objects queued; those being written.
    _pending: dict[ObjectKey, dict[str, Any]] = field(default_factory=dict)
    # Statuses before Events: at a fleet's start 2,000 deployments' first Events would
    # otherwise sit in front of their Ready statuses (each item: priority, order, item).
    _queue: asyncio.PriorityQueue[tuple[int, int, _Item]] | None = None
    _order: itertools.count[int] = field(default_factory=itertools.count)
    _events: int = 0  # Events queued or being posted
    _sending: set[ObjectKey] = field(default_factory=set)
    _retries: dict[ObjectKey, int] = field(default_factory=dict)
    _workers: list[asyncio.Task[None]] = field(default_factory=list)
    _pool: ThreadPoolExecutor | None = None

    async def write_statuses(
        self,
        statuses: Mapping[str, ModelDeploymentStatus],
        desired: Desired,
        resync: bool,
        gateways: Mapping[str, ModelGatewayStatus] | None = None,
    ) -> None:
        """Hand over the statuses that changed, and only those; returns without waiting for
        the API server. ModelGateways' the same way."""
        self.last_changed = self._offer_changed(
            statuses, desired.previous, self.written, deployment_api.PLURAL, resync
        )
        if gateways:
            self._offer_changed(
                gateways,
                desired.gateway_previous,
                self.gateways_written,
                gateway_api.PLURAL,
                resync,
            )

    def _offer_changed(
        self,
        statuses: Mapping[str, ModelDeploymentStatus | ModelGatewayStatus],
        previous: Mapping[str, dict[str, Any]],
        written: dict[str, dict[str, Any]],
        plural: str,
        resync: bool,
    ) -> set[str]:
        """Queue a PATCH of each status that differs from what the object has. A resync
        compares with what the API server has (heals a lost write); other passes with what
        this operator last handed over (the index may still lag behind it)."""
        changed: set[str] = set()
        for key, status in statuses.items():
            patch = status_patch(status)
            before = previous.get(key) if resync else written.get(key)
            if before is None:
                before = previous.get(key)
            if same_status(before or {}, patch):
                continue
            changed.add(key)
            written[key] = {k: v for k, v in patch.items() if v is not None}
            self._offer((plural, key), patch)
        return changed

    def _offer(self, target: ObjectKey, patch: dict[str, Any]) -> None:
        queue = self._started()
        queued = target in self._pending or target in self._sending
        self._pending[target] = patch
        if not queued:
            self._put(queue, target)
        self._count()

    async def post_events(
        self, views: Mapping[str, DeploymentView], uids: Mapping[str, str]
    ) -> None:
        """New events only (an identical one is let through once an hour), posted in the
        background; one that fails is logged, not retried."""
        queue = self._started()
        for key, view in views.items():
            for event in view.events:
                if self.events.admit(key, event):
                    namespace, name = split_key(key)
                    reference = {"namespace": namespace, "name": name, "uid": uids.get(key, "")}
                    self._put(queue, _EventPost(key, reference, event))
        self._count()

    def forget(self, key: str) -> None:
        self.written.pop(key, None)
        self._pending.pop((deployment_api.PLURAL, key), None)
        self._retries.pop((deployment_api.PLURAL, key), None)
        self.events.forget(key)

    async def settled(self) -> None:
        """Until every handed-over status and event is written (or retried later)."""
        self._started()
        assert self._queue is not None
        await self._queue.join()

    async def close(self) -> None:
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # -- the writers ----------------------------------------------------------------------

    def _started(self) -> asyncio.PriorityQueue[tuple[int, int, _Item]]:
        """The queue and its writers, made in the running event loop on first use."""
        if self._queue is None:
            self._queue = asyncio.PriorityQueue()
            self._pool = ThreadPoolExecutor(STATUS_WRITERS, thread_name_prefix="status-write")
            self._workers = [
                asyncio.create_task(self._work(), name=f"status writer {n}")
                for n in range(STATUS_WRITERS)
            ]
        return self._queue

    async def _work(self) -> None:
        assert self._queue is not None
        while True:
            _, _, item = await self._queue.get()
            try:
                if isinstance(item, _EventPost):
                    await self._post(item)
                else:
                    await self._patch(item)
            except Exception as error:  # never lose a writer
                metrics.background_errors_total.labels("status-writer").inc()
                log.warning("status writer error", error=repr(error))
            finally:
                self._events -= isinstance(item, _EventPost)
                self._queue.task_done()
                self._count()

    async def _patch(self, target: ObjectKey) -> None:
        patch = self._pending.pop(target, None)
        if patch is None:
            return
        plural, key = target
        namespace, name = split_key(key)
        self._sending.add(target)
        try:
            found = await self._call(self.kube.patch_status, namespace, name, patch, plural)
        except Exception as error:
            metrics.kube_api_errors_total.labels("status").inc()
            log.warning("status write failed", object=f"{plural}/{key}", error=_short(error))
            self._sending.discard(target)
            if target not in self._pending:  # a newer status goes first, and replaces it
                self._pending[target] = patch
                self._retry_later(target)
            else:
                self._requeue(target)
            return
        self._sending.discard(target)
        self._retries.pop(target, None)
        if not found:  # the object is gone
            written = self.written if plural == deployment_api.PLURAL else self.gateways_written
            written.pop(key, None)
        if target in self._pending:  # a newer status arrived while this one was sent
            self._requeue(target)

    def _retry_later(self, target: ObjectKey) -> None:
        failures = self._retries.get(target, 0) + 1
        self._retries[target] = failures
        delay = min(STATUS_RETRY_MAX_SECONDS, STATUS_RETRY_SECONDS * 2 ** (failures - 1))
        asyncio.get_running_loop().call_later(delay, self._requeue, target)

    def _requeue(self, target: ObjectKey) -> None:
        if self._queue is not None and target in self._pending and target not in self._sending:
            self._put(self._queue, target)

    def _put(self, queue: asyncio.PriorityQueue[tuple[int, int, _Item]], item: _Item) -> None:
        event = isinstance(item, _EventPost)
        self._events += event
        queue.put_nowait((1 if event else 0, next(self._order), item))

    async def _post(self, post: _EventPost) -> None:
        event = post.event
        try:
            await self._call(
                self.kube.post_event, post.reference, event.type, event.reason, event.message
            )
        except Exception as error:
            metrics.kube_api_errors_total.labels("event").inc()
            log.warning("event not posted", deployment=post.key, error=str(error))

    async def _call(self, function: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, function, *args)

    def _count(self) -> None:
        metrics.status_writes_pending.set(len(self._pending) + len(self._sending))
        metrics.events_pending.set(self._events)


def _short(error: Exception) -> str:
    """An API error's first line: a 429's headers and body say nothing more."""
    return str(error).splitlines()[0] if str(error) else repr(error)


def status_patch(status: ModelDeploymentStatus | ModelGatewayStatus) -> dict[str, Any]:
    """A merge patch: unset nested fields are left out, unset top-level ones are deleted."""
    patch: dict[str, Any] = status.model_dump(mode="json", exclude_none=True)
    for key, value in status.model_dump(mode="json").items():
        if value is None:
            patch[key] = None
    return patch


def same_status(before: Mapping[str, Any], patch: Mapping[str, Any]) -> bool:
    return all(before.get(key) == value for key, value in patch.items())
