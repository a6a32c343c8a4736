"""kopf wiring only: decorators that hand each event to the Reconciler and write back status,
events and reconcile metrics. Everything that decides anything lives in the pure modules."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

import kopf
import structlog
from prometheus_client import start_http_server
from pydantic import ValidationError

from npuswarm import api, metrics, policy
from npuswarm.api import ModelDeployment, validation_message
from npuswarm.events import Event, EventFilter, EventType
from npuswarm.peering import is_active
from npuswarm.reconcile import Reconciler, utcnow
from npuswarm.settings import Settings
from npuswarm.status import invalid_spec_status, unavailable_status
from npuswarm.swarm import Swarm, SwarmUnavailable

log = structlog.get_logger("npuswarm.handlers")
RESOURCE = (api.GROUP, api.VERSION, api.PLURAL)
SETTINGS = Settings.from_env()
MAX_BACKOFF_SECONDS = 300.0
MAX_WORKERS = 4

# Who this instance is in kopf's peering object: the pod name in a cluster, else host and pid.
IDENTITY = os.environ.get("POD_ID") or f"npuswarm@{socket.gethostname()}/{os.getpid()}"

_reconciler: Reconciler | None = None
_events = EventFilter()


def reconciler() -> Reconciler:
    global _reconciler  # noqa: PLW0603 - one per process, created when the operator starts
    if _reconciler is None:
        _reconciler = Reconciler(Swarm(timeout=SETTINGS.docker_timeout_seconds), SETTINGS)
    return _reconciler


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = f"{api.GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=api.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=api.GROUP, key="last-handled-configuration"
    )
    # kopf would post an Event for every successful timer tick; only npuswarm's own events
    # and real warnings should reach `kubectl describe`.
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = MAX_WORKERS
    settings.watching.server_timeout = 300
    metrics.max_concurrent_reconciles.labels(metrics.CONTROLLER).set(MAX_WORKERS)
    start_http_server(SETTINGS.metrics_port, registry=metrics.REGISTRY)
    threading.Thread(target=_probe_swarm, name="swarm-probe", daemon=True).start()
    peering = settings.peering
    threading.Thread(
        target=_watch_leadership,
        args=(peering.standalone, peering.mandatory, peering.name, peering.priority),
        name="leadership",
        daemon=True,
    ).start()
    log.info("npuswarm started", metrics_port=SETTINGS.metrics_port, settings=SETTINGS.__dict__)


def _watch_leadership(standalone: bool, mandatory: bool, name: str, priority: int) -> None:
    """npuswarm_leader: 1 while kopf lets this instance work, by kopf's own peering rule."""
    if standalone:
        metrics.leader.set(1)
        return
    import kubernetes

    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()  # type: ignore[no-untyped-call]
    objects = kubernetes.client.CustomObjectsApi()
    while True:
        try:
            peering: dict[str, Any] = objects.get_cluster_custom_object(  # type: ignore[assignment]
                "kopf.dev", "v1", "clusterkopfpeerings", name
            )
            active = is_active(peering.get("status") or {}, IDENTITY, priority, utcnow())
        except kubernetes.client.ApiException as error:
            # No peering object: kopf runs standalone, unless peering was made mandatory.
            active = error.status == 404 and not mandatory
        metrics.leader.set(1 if active else 0)
        time.sleep(SETTINGS.swarm_probe_seconds)


def _probe_swarm() -> None:
    """Reachability of the manager goes into a metric, not liveness: restarting the operator
    would not bring Docker back, and a restart loop would hide the real problem."""
    while True:
        reconciler().swarm.ping()
        time.sleep(SETTINGS.swarm_probe_seconds)


@kopf.index(*RESOURCE)
def deployments(*, body: kopf.Body, namespace: str | None, name: str, **_: Any) -> dict[Any, Any]:
    return {(namespace, name): {"metadata": dict(body.metadata), "spec": dict(body.spec)}}


def _parse(raw: dict[str, Any]) -> ModelDeployment:
    return ModelDeployment.model_validate(raw)


def _everyone(index: kopf.Index[Any, Any]) -> list[ModelDeployment]:
    """All valid deployments; an invalid one asks for nothing until it is fixed."""
    valid = []
    for store in index.values():
        for raw in store:
            try:
                md = _parse(raw)
            except ValidationError:
                continue
            if not policy.violations(md, SETTINGS):
                valid.append(md)
    return valid


def _reconcile(
    body: kopf.Body,
    patch: kopf.Patch,
    deployments: kopf.Index[Any, Any],
    retry: int,
) -> None:
    """Reconcile metrics and log context around one pass."""
    started = time.monotonic()
    obj = f"{body.metadata.namespace}/{body.metadata.name}"
    metrics.active_workers.labels(metrics.CONTROLLER).inc()
    result = "error"
    # Every line logged during this reconcile, here or deeper, carries these two fields.
    with structlog.contextvars.bound_contextvars(
        deployment=obj, reconcile_id=uuid.uuid4().hex[:12]
    ):
        try:
            result = _reconcile_once(obj, body, patch, deployments, retry)
        finally:
            elapsed = time.monotonic() - started
            metrics.active_workers.labels(metrics.CONTROLLER).dec()
            metrics.reconcile_total.labels(metrics.CONTROLLER, result).inc()
            metrics.reconcile_time_seconds.labels(metrics.CONTROLLER).observe(elapsed)
            if result == "error":
                metrics.reconcile_errors_total.labels(metrics.CONTROLLER).inc()
            log.info("reconciled", result=result, duration_seconds=round(elapsed, 3))


def _reconcile_once(
    obj: str,
    body: kopf.Body,
    patch: kopf.Patch,
    deployments: kopf.Index[Any, Any],
    retry: int,
) -> str:
    """One pass; returns controller-runtime's result label, raises to make kopf retry."""
    generation = int(body.metadata.get("generation") or 0)
    previous = dict(body.get("status") or {})
    try:
        md = _parse({"metadata": dict(body.metadata), "spec": dict(body.spec)})
        reason, message = policy.REASON, "; ".join(policy.violations(md, SETTINGS))
    except ValidationError as error:
        reason, message = "InvalidSpec", validation_message(error)
    if message:
        return _refuse(obj, body, patch, reason, message)
    try:
        outcome = reconciler().reconcile(md, _everyone(deployments), previous)
    except policy.Refused as error:
        return _refuse(obj, body, patch, policy.REASON, str(error))
    except SwarmUnavailable as error:
        patch.status.update(
            _status_patch(unavailable_status(generation, str(error), previous, utcnow()))
        )
        delay = min(MAX_BACKOFF_SECONDS, 5.0 * 2**retry)
        log.warning("swarm unavailable", error=str(error), retry_in=delay)
        raise kopf.TemporaryError(f"Swarm unavailable: {error}", delay=delay) from error
    patch.status.update(_status_patch(outcome.status))
    for event in outcome.events:
        _post(body, obj, event.type, event.reason, event.message)
    _record(md, outcome.status, outcome.unplaced_reasons)
    return "requeue_after" if outcome.requeue else "success"


def _refuse(obj: str, body: kopf.Body, patch: kopf.Patch, reason: str, message: str) -> str:
    """An invalid or refused spec: say why in the status and an event, write nothing."""
    generation = int(body.metadata.get("generation") or 0)
    previous = dict(body.get("status") or {})
    patch.status.update(
        _status_patch(invalid_spec_status(generation, message, previous, utcnow(), reason))
    )
    _post(body, obj, "Warning", reason, message)
    _record_phase(body.metadata.namespace or "default", body.metadata.name or "", "Invalid")
    log.warning("invalid spec", reason=reason, error=message)
    return "success"  # handled: a status to fix, not a retry loop


def _status_patch(status: api.ModelDeploymentStatus) -> dict[str, Any]:
    """A merge patch: unset nested fields are left out, unset top-level ones are deleted."""
    patch: dict[str, Any] = status.model_dump(mode="json", exclude_none=True)
    for key, value in status.model_dump(mode="json").items():
        if value is None:
            patch[key] = None
    return patch


def _post(body: kopf.Body, obj: str, type_: EventType, reason: str, message: str) -> None:
    if _events.admit(obj, Event(type_, reason, message)):
        kopf.event(body, type=type_, reason=reason, message=message)


def _record(
    md: ModelDeployment, status: api.ModelDeploymentStatus, unplaced: dict[str, int]
) -> None:
    namespace, name = md.metadata.namespace, md.metadata.name
    metrics.replicas_desired.labels(namespace, name).set(status.replicas)
    metrics.replicas_placed.labels(namespace, name).set(status.placedReplicas)
    metrics.replicas_ready.labels(namespace, name).set(status.readyReplicas)
    metrics.set_unplaced(namespace, name, unplaced)
    _record_phase(namespace, name, status.phase)


def _record_phase(namespace: str, name: str, phase: str) -> None:
    """An invalid spec is handled too: it is the user's to fix, not a stalled operator."""
    metrics.last_success_timestamp.labels(namespace, name).set(time.time())
    _PHASES[(namespace, name)] = phase
    _publish_phases()


_PHASES: dict[tuple[str, str], str] = {}


def _publish_phases() -> None:
    counts = dict.fromkeys(("Pending", "Progressing", "Ready", "Degraded", "Invalid"), 0)
    for phase in _PHASES.values():
        counts[phase] = counts.get(phase, 0) + 1
    for phase, count in counts.items():
        metrics.deployments.labels(phase).set(count)


@kopf.on.resume(*RESOURCE)
def on_resume(*, body: kopf.Body, patch: kopf.Patch, **kwargs: Any) -> None:
    _reconcile(body, patch, kwargs["deployments"], kwargs.get("retry", 0))


@kopf.on.create(*RESOURCE)
def on_create(*, body: kopf.Body, patch: kopf.Patch, **kwargs: Any) -> None:
    _reconcile(body, patch, kwargs["deployments"], kwargs.get("retry", 0))


@kopf.on.update(*RESOURCE, field="spec")
def on_update(*, body: kopf.Body, patch: kopf.Patch, **kwargs: Any) -> None:
    _reconcile(body, patch, kwargs["deployments"], kwargs.get("retry", 0))


@kopf.timer(*RESOURCE, interval=SETTINGS.resync_seconds, initial_delay=SETTINGS.resync_seconds)
def resync(*, body: kopf.Body, patch: kopf.Patch, **kwargs: Any) -> None:
    """Level-triggered safety net: drift in Swarm raises no Kubernetes event."""
    _reconcile(body, patch, kwargs["deployments"], kwargs.get("retry", 0))


@kopf.on.delete(*RESOURCE)
def on_delete(*, namespace: str | None, name: str, **_: Any) -> None:
    """Runs behind npuswarm's finalizer: the services go before the resource does."""
    namespace = namespace or "default"
    try:
        removed = reconciler().finalize(namespace, name)
    except SwarmUnavailable as error:
        raise kopf.TemporaryError(f"Swarm unavailable, services kept: {error}", delay=15) from error
    _events.forget(f"{namespace}/{name}")
    _PHASES.pop((namespace, name), None)
    _publish_phases()
    metrics.forget_deployment(namespace, name)
    log.info("deployment deleted", deployment=f"{namespace}/{name}", services_removed=removed)


@kopf.on.probe(id="swarm")
def swarm_probe(**_: Any) -> bool | None:
    """The background probe's last answer, shown in the liveness JSON. It never fails liveness
    and never waits on Docker, so a slow manager cannot time the probe out (see _probe_swarm)."""
    return reconciler().swarm.reachable
