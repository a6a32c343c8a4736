"""The Kubernetes side of a pass that kopf does not cover: writing many statuses from one
pass, the complete read that confirms orphans, and the peering objects for leadership."""

from __future__ import annotations

import base64
import os
import secrets
import time
from typing import Any

import kubernetes
import structlog

from npuswarm import metrics
from npuswarm.api import deployment as deployment_api
from npuswarm.api import meta
from npuswarm.api.meta import object_key, split_key
from npuswarm.core import quota
from npuswarm.core.clock import timestamp, utcnow
from npuswarm.gateway.access import KeySet

log = structlog.get_logger("npuswarm.kube")
# A rotated API key works at the gateway at most this long after the Secret changed (plus a
# pass and a push).
KEYS_TTL_SECONDS = 5.0
# With NPUSWARM_ROOT_KEY empty, the operator keeps its root key in this Secret of its own
# namespace (docs/install.md): made once by the first instance, read by every later one.
ROOT_KEY_SECRET = "npuswarm-root-key"
ROOT_KEY_ENTRY = "root-key"
# Where the kubelet tells a pod its namespace (the ServiceAccount's projected files).
NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def own_namespace(path: str = NAMESPACE_FILE) -> str | None:
    """The operator's namespace: POD_NAMESPACE (the Deployment sets it), else the
    ServiceAccount's namespace file; None outside a cluster."""
    found = os.environ.get("POD_NAMESPACE")
    if found:
        return found
    try:
        with open(path, encoding="ascii") as file:
            return file.read().strip() or None
    except OSError:
        return None


class Kube:
    def __init__(
        self, namespaces: frozenset[str] | None = None, api_client: Any | None = None
    ) -> None:
        # None: cluster-wide; else only these namespaces may be listed (a namespaced Role).
        self.namespaces = namespaces
        if api_client is None:  # the process's own config (a second identity: api_client)
            try:
                kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
            except kubernetes.config.ConfigException:
                kubernetes.config.load_kube_config()  # type: ignore[no-untyped-call]
        self.objects = kubernetes.client.CustomObjectsApi(api_client)
        self.core = kubernetes.client.CoreV1Api(api_client)

    def patch_status(
        self, namespace: str, name: str, patch: dict[str, Any], plural: str = deployment_api.PLURAL
    ) -> bool:
        """A merge patch of the status subresource; False when the object is gone."""
        try:
            self.objects.patch_namespaced_custom_object_status(
                meta.GROUP, meta.VERSION, namespace, plural, name, {"status": patch}
            )
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return False
            raise
        return True

    def post_event(self, reference: dict[str, str], type_: str, reason: str, message: str) -> None:
        """A core/v1 Event on a ModelDeployment, as kopf posts them (POST only)."""
        now = timestamp(utcnow())
        namespace = reference["namespace"]
        body: Any = {
            "metadata": {"generateName": f"{reference['name']}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": f"{meta.GROUP}/{meta.VERSION}",
                "kind": deployment_api.KIND,
                "namespace": namespace,
                "name": reference["name"],
                "uid": reference["uid"],
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "npuswarm"},
            "reportingComponent": "npuswarm",
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self.core.create_namespaced_event(namespace, body)

    def quota_namespaces(self) -> set[str] | None:
        """The namespaces whose Namespace object carries an NPU quota annotation, from one
        complete LIST; None when it could not be read (docs/priority.md)."""
        try:
            listed = self.core.list_namespace()
        except Exception as error:
            metrics.kube_api_errors_total.labels("index_list").inc()
            log.warning("cannot list namespaces", error=str(error))
            return None
        if listed.metadata and listed.metadata._continue:
            return None
        return {
            str(item.metadata.name)
            for item in listed.items or []
            if item.metadata is not None and quota.ANNOTATION in (item.metadata.annotations or {})
        }

    def existing(self, owners: set[str], plural: str = deployment_api.PLURAL) -> set[str] | None:
        """Which of ``owners`` (objects of ``plural``: ModelDeployments unless said) exist,
        from one complete LIST; None on any failure, so that nothing is ever removed on a
        failed or partial read."""
        scopes = None if self.namespaces is None else {split_key(o)[0] for o in owners}
        found = self.listed(plural, scopes)
        return None if found is None else owners & found

    def listed(
        self, plural: str, scopes: set[str] | None = None, operation: str = "orphan_list"
    ) -> set[str] | None:
        """The ``namespace/name`` of every object of ``plural`` in the watched namespaces (of
        those in ``scopes`` too, when given), from complete LISTs; None when any fails or
        comes back partial (counted as ``operation`` in npuswarm_kube_api_errors_total)."""
        found: set[str] = set()
        namespaces: list[str | None] = [None]
        if self.namespaces is not None:
            namespaces = [*sorted(self.namespaces if scopes is None else scopes & self.namespaces)]
        for namespace in namespaces:
            try:
                if namespace is None:
                    listed: dict[str, Any] = self.objects.list_cluster_custom_object(  # type: ignore[assignment]
                        meta.GROUP, meta.VERSION, plural
                    )
                else:
                    listed = self.objects.list_namespaced_custom_object(  # type: ignore[assignment]
                        meta.GROUP, meta.VERSION, namespace, plural
                    )
            except Exception as error:
                metrics.kube_api_errors_total.labels(operation).inc()
                log.warning(f"cannot list {plural}", error=str(error))
                return None
            if (listed.get("metadata") or {}).get("continue"):
                return None  # a partial page: not a complete read
            found.update(
                object_key(item["metadata"].get("namespace", ""), item["metadata"]["name"])
                for item in listed.get("items") or []
            )
        return found

    def peering_status(self, name: str, namespace: str | None) -> dict[str, Any] | None:
        """kopf's peering object's status; None when there is no such object."""
        try:
            if namespace is None:
                found: dict[str, Any] = self.objects.get_cluster_custom_object(  # type: ignore[assignment]
                    "kopf.dev", "v1", "clusterkopfpeerings", name
                )
            else:
                found = self.objects.get_namespaced_custom_object(  # type: ignore[assignment]
                    "kopf.dev", "v1", namespace, "kopfpeerings", name
                )
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return None
            raise
        return dict(found.get("status") or {})

    def read_secret(self, namespace: str, name: str) -> tuple[dict[str, bytes], str] | None:
        """A Secret's entries (decoded) and resourceVersion; None when it does not exist.
        The operator may `get` Secrets, never list them (manifests/base/rbac.yaml)."""
        try:
            secret = self.core.read_namespaced_secret(name, namespace)
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return None
            raise
        data = {key: base64.b64decode(value) for key, value in (secret.data or {}).items()}
        version = secret.metadata.resource_version if secret.metadata is not None else None
        return data, str(version or "")


def root_key(kube: Kube, namespace: str) -> str:
    """The root key kept in ``namespace``'s Secret ``npuswarm-root-key``: read, or created
    with 32 random bytes when it does not exist. Never updated: an instance that loses the
    race to create it (409) reads the winner's, so every instance holds the same key."""
    found = kube.read_secret(namespace, ROOT_KEY_SECRET)
    if found is None:
        body: Any = {
            "metadata": {
                "name": ROOT_KEY_SECRET,
                "namespace": namespace,
                "labels": {"app.kubernetes.io/name": "npuswarm"},
                "annotations": {
                    "npuswarm.io/about": "the root of every credential npuswarm hands out "
                    "(gateways', node agents'); made by the operator since NPUSWARM_ROOT_KEY "
                    "is empty. Deleting it changes every credential at the next start."
                },
            },
            "type": "Opaque",
            "stringData": {ROOT_KEY_ENTRY: secrets.token_hex(32)},
        }
        try:
            kube.core.create_namespaced_secret(namespace, body)
            log.info("root key secret created", secret=f"{namespace}/{ROOT_KEY_SECRET}")
        except kubernetes.client.ApiException as error:
            if error.status != 409:
                raise
        found = kube.read_secret(namespace, ROOT_KEY_SECRET)
    if found is None or not found[0].get(ROOT_KEY_ENTRY):
        raise ValueError(f"Secret {namespace}/{ROOT_KEY_SECRET} has no {ROOT_KEY_ENTRY!r} entry")
    return found[0][ROOT_KEY_ENTRY].decode()


class SecretKeys:
    """ModelGateways' API keys Secrets, read at most every ``ttl`` seconds each, hashed at once
    (gateway/access.py): no key is kept. A failed read keeps the last keys (an API server
    outage does not lock clients out); a Secret that does not exist has no keys."""

    def __init__(self, kube: Kube, ttl: float = KEYS_TTL_SECONDS) -> None:
        self.kube = kube
        self.ttl = ttl
        self._cache: dict[tuple[str, str], tuple[float, KeySet | None]] = {}

    def keys(self, namespace: str, name: str) -> KeySet | None:
        now = time.monotonic()
        cached = self._cache.get((namespace, name))
        if cached is not None and now - cached[0] < self.ttl:
            return cached[1]
        try:
            found = self.kube.read_secret(namespace, name)
        except Exception as error:
            metrics.kube_api_errors_total.labels("secret").inc()
            log.warning("API keys not read", secret=f"{namespace}/{name}", error=str(error)[:200])
            return cached[1] if cached is not None else None
        keys = None if found is None else KeySet.from_secret_data(*found)
        self._cache[(namespace, name)] = (now, keys)
        return keys
