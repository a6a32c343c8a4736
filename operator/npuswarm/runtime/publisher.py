"""The status publisher: a pass's statuses and Events go to the API server, only those that
changed, a few at a time; a refused write asks for a pass in a few seconds. It remembers what
it wrote, since kopf's index lags behind the operator's own writes."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
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
from npuswarm.runtime.triggers import Triggers

log = structlog.get_logger("npuswarm.runtime")

STATUS_WRITERS = 8
STATUS_RETRY_SECONDS = 3.0


class StatusWriter(Protocol):
    """What the publisher needs of the API server (kube.Kube has it)."""

    def patch_status(
        self, namespace: str, name: str, patch: dict[str, Any], plural: str = ...
    ) -> bool: ...
    def post_event(
        self, reference: dict[str, str], type_: str, reason: str, message: str
    ) -> None: ...


@dataclass
class StatusPublisher:
    kube: StatusWriter
    triggers: Triggers
    # The statuses this operator last wrote, by namespace/name: deployments', gateways'.
    written: dict[str, dict[str, Any]] = field(default_factory=dict)
    gateways_written: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: EventFilter = field(default_factory=EventFilter)
    # The deployments whose status the last write changed.
    last_changed: set[str] = field(default_factory=set)

    async def write_statuses(
        self,
        statuses: Mapping[str, ModelDeploymentStatus],
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
            self.triggers.request_later(STATUS_RETRY_SECONDS, [*failed])

    async def _patch_changed(
        self,
        statuses: Mapping[str, ModelDeploymentStatus | ModelGatewayStatus],
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
            if not same_status(before or {}, patch):
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

    async def post_events(
        self, views: Mapping[str, DeploymentView], uids: Mapping[str, str]
    ) -> None:
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
        self.events.forget(key)


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
