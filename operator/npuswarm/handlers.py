"""kopf wiring only. Handlers do not observe or place: they mark a deployment as wanting a
pass, and the pass loop (npuswarm.runtime, kept in kopf's memo) serves them all at once.
Deletion runs behind npuswarm's finalizer and waits for any running pass."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any

import kopf
import kubernetes
import structlog
from prometheus_client import start_http_server
from pydantic import SecretStr

from npuswarm import metrics
from npuswarm.api import deployment as deployment_api
from npuswarm.api import gateway as gateway_api
from npuswarm.api import meta
from npuswarm.api.meta import metadata_key
from npuswarm.core import quota
from npuswarm.gateway.credentials import Credentials
from npuswarm.gateway.push import Gateways
from npuswarm.gateway.service import gateway_key
from npuswarm.kube import ROOT_KEY_SECRET, Kube, SecretKeys, own_namespace, root_key
from npuswarm.reconcile import Reconciler
from npuswarm.runtime import Leadership, Runtime, heap
from npuswarm.runtime.index import index_event
from npuswarm.settings import Settings
from npuswarm.swarm import Swarm, SwarmUnavailable

log = structlog.get_logger("npuswarm.handlers")
RESOURCE = (meta.GROUP, meta.VERSION, deployment_api.PLURAL)
GATEWAYS = (meta.GROUP, meta.VERSION, gateway_api.PLURAL)
MAX_WORKERS = 4

# Who this instance is in kopf's peering object: the pod name in a cluster, else host and pid.
IDENTITY = os.environ.get("POD_ID") or f"npuswarm@{socket.gethostname()}/{os.getpid()}"
# The namespaces `npuswarm run -n` watches (comma-separated); unset: the whole cluster.
NAMESPACES_ENV = "NPUSWARM_WATCH_NAMESPACES"


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **kwargs: Any) -> None:
    settings.persistence.finalizer = f"{meta.GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=meta.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=meta.GROUP, key="last-handled-configuration"
    )
    # kopf would post an Event for every handler run; only npuswarm's own events and real
    # warnings should reach `kubectl describe`.
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = MAX_WORKERS
    settings.watching.server_timeout = 300
    metrics.max_concurrent_reconciles.labels(metrics.CONTROLLER).set(1)

    config = Settings.from_env()
    settings.peering.lifetime = config.peering_lifetime_seconds
    watched = os.environ.get(NAMESPACES_ENV)
    namespaces = frozenset(n for n in watched.split(",") if n) if watched else None
    swarm = Swarm(timeout=config.docker_timeout_seconds, instance=config.instance)
    kube = Kube(namespaces)
    config = with_root_key(config, kube)
    peering = settings.peering
    runtime = Runtime(
        settings=config,
        reconciler=Reconciler(
            swarm,
            config,
            owners=kube,
            gateways=Gateways(
                config.instance,
                gateway_credentials(config),
                policy=config.tenant_policy(),
                keys=SecretKeys(kube),
            ),
        ),
        kube=kube,
        leadership=Leadership(
            standalone=peering.standalone,
            mandatory=peering.mandatory,
            name=peering.name,
            priority=peering.priority,
            identity=IDENTITY,
            namespaces=namespaces,
        ),
        loop=asyncio.get_running_loop(),
    )
    memo.runtime = runtime
    heap.tune()
    start_http_server(config.metrics_port, registry=metrics.REGISTRY)
    runtime.start()
    log.info("npuswarm started", metrics_port=config.metrics_port, settings=config.__dict__)


def with_root_key(config: Settings, kube: Kube) -> Settings:
    """``config`` with a root key: NPUSWARM_ROOT_KEY, else the one in the Secret
    npuswarm-root-key of the operator's namespace (made now if missing), so a fresh install
    runs node agents and gateways without the admin making a key. When that fails (no
    namespace known, RBAC), gateways and node agents stay off and say which setting."""
    if config.root_key.get_secret_value():
        return config
    namespace = own_namespace()
    if namespace is None:
        log.warning("no root key", why="NPUSWARM_ROOT_KEY is empty and no namespace is known")
        return config
    try:
        key = root_key(kube, namespace)
    except (kubernetes.client.ApiException, ValueError) as error:
        log.error("root key secret not read", namespace=namespace, error=str(error)[:300])
        return config
    log.info("root key from secret", secret=f"{namespace}/{ROOT_KEY_SECRET}")
    return config.model_copy(update={"root_key": SecretStr(key)})


def gateway_credentials(config: Settings) -> Credentials | None:
    root = config.root_key.get_secret_value()
    return Credentials(root, config.instance) if root else None


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    runtime: Runtime = memo.runtime
    await runtime.close()


def _indexed(body: kopf.Body) -> dict[str, Any]:
    """What the pass reads of an object, kept in its index (filled here rather than by
    @kopf.index: runtime/index.py index_event says why)."""
    return {
        "metadata": dict(body.metadata),
        "spec": dict(body.spec),
        "status": dict(body.get("status") or {}),
    }


@kopf.on.event(*RESOURCE)
async def wants_pass(
    *,
    type: str | None,
    body: kopf.Body,
    namespace: str | None,
    name: str | None,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """A new object, a new generation (spec change), a deletion starting or done: a pass.
    Status-only changes (npuswarm's own status writes) ask for nothing.

    A raw event handler rather than create/update/resume: kopf persists nothing for it, where
    those would PATCH two annotations onto every object (4,000 writes for 2,000 objects at an
    operator start, enough to be throttled by the API server)."""
    runtime: Runtime = memo.runtime
    metadata = body.get("metadata") or {}
    key = metadata_key(metadata)
    index_event(runtime.index, type, (namespace, name), _indexed(body))
    if type == "DELETED":
        runtime.request(key)
        return
    if runtime.changed(key, metadata):
        runtime.request(key)


@kopf.on.delete(*RESOURCE)
def on_delete(
    *,
    body: kopf.Body,
    namespace: str | None,
    name: str,
    uid: str | None,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """Behind npuswarm's finalizer: the services go before the resource does. Waits for a
    running pass, and no later pass writes for this deployment again."""
    runtime: Runtime = memo.runtime
    key = metadata_key(body.metadata)
    try:
        removed = runtime.reconciler.finalize(namespace or "default", name, uid or "")
    except SwarmUnavailable as error:
        raise kopf.TemporaryError(f"Swarm unavailable, services kept: {error}", delay=15) from error
    runtime.request_threadsafe(None)  # the NPUs it held are free for others now
    runtime.deleted(key)
    log.info("deployment deleted", deployment=key, services_removed=removed)


@kopf.on.event(*GATEWAYS)
async def gateway_wants_pass(
    *,
    type: str | None,
    body: kopf.Body,
    namespace: str | None,
    name: str | None,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """A new gateway or a new generation: a pass (its status writes ask for nothing)."""
    runtime: Runtime = memo.runtime
    index_event(runtime.gateway_index, type, (namespace, name), _indexed(body))
    metadata = body.get("metadata") or {}
    changed = runtime.changed(gateway_key(metadata_key(metadata)), metadata)
    if type == "DELETED" or changed:
        runtime.request(None)


@kopf.on.delete(*GATEWAYS)
def on_gateway_delete(
    *,
    body: kopf.Body,
    namespace: str | None,
    name: str,
    uid: str | None,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """Behind npuswarm's finalizer: the gateway's services go before the resource does."""
    runtime: Runtime = memo.runtime
    try:
        removed = runtime.reconciler.finalize_gateway(namespace or "default", name, uid or "")
    except SwarmUnavailable as error:
        raise kopf.TemporaryError(f"Swarm unavailable, services kept: {error}", delay=15) from error
    log.info("gateway deleted", gateway=metadata_key(body.metadata), services_removed=removed)


@kopf.on.event("", "v1", "namespaces")
async def quota_wants_pass(
    *,
    type: str | None,
    name: str | None,
    annotations: kopf.Annotations,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """Each Namespace's NPU quota annotation, set by the cluster admin (docs/priority.md),
    into the quota index (a namespace without one is not in it); a quota set, changed or
    removed asks for a pass (other Namespace changes ask for nothing)."""
    runtime: Runtime | None = getattr(memo, "runtime", None)
    value = annotations.get(quota.ANNOTATION)
    if runtime is None or not name:
        return
    index_event(runtime.quota_index, type, name, value)
    if runtime.reader.quota_changed(name, None if type == "DELETED" else value):
        runtime.request(None)


@kopf.on.probe(id="swarm")
def swarm_probe(memo: kopf.Memo, **_: Any) -> bool | None:
    """The background probe's last answer, shown in the liveness JSON. It never fails
    liveness and never waits on Docker, so a slow manager cannot time the probe out."""
    runtime: Runtime | None = getattr(memo, "runtime", None)
    if runtime is None:
        return None
    return runtime.swarm_reachable
