"""Is this operator instance the active one? kopf decides, from its peering object, and exposes
no hook; this reads the same object and applies the same rule, for the npuswarm_leader gauge.

kopf's rule: an instance pauses while a live peer has a higher priority, or the same priority
(then every one of them pauses). A peer is live until lastseen + lifetime.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any

import kubernetes

from npuswarm.core.clock import parse_engine_time


def is_active(status: dict[str, Any], own_id: str, own_priority: int, now: datetime) -> bool:
    for identity, info in status.items():
        if identity == own_id or not isinstance(info, dict):
            continue
        seen = parse_engine_time(info.get("lastseen"))
        lifetime = timedelta(seconds=int(info.get("lifetime", 60)))
        if seen is None or seen + lifetime <= now:
            continue  # dead: kopf ignores (and cleans) it
        if int(info.get("priority", 0)) >= own_priority:
            return False
    return True


def record_until(status: dict[str, Any], identity: str) -> datetime | None:
    """Until when ``identity``'s record counts as live for its peers (lastseen + lifetime)."""
    info = status.get(identity)
    if not isinstance(info, dict):
        return None
    seen = parse_engine_time(info.get("lastseen"))
    if seen is None:
        return None
    return seen + timedelta(seconds=int(info.get("lifetime", 60)))


def others_until(status: dict[str, Any], own_id: str) -> dict[str, datetime]:
    """Until when each other instance's record counts as live (past ones included)."""
    found = {identity: record_until(status, identity) for identity in status if identity != own_id}
    return {identity: until for identity, until in found.items() if until is not None}


GROUP, VERSION, PLURAL = "kopf.dev", "v1", "clusterkopfpeerings"


class PeeringUnavailableError(RuntimeError):
    """The peering object could not be found or created before the deadline."""


def ensure_peering_object(name: str, timeout: float = 120.0, interval: float = 2.0) -> bool:
    """Create the ClusterKopfPeering `name` unless it exists; True when this call created it.

    The object is not in the manifests: kubectl cannot create an object of a kind whose CRD
    is in the same apply, so `kubectl apply -k manifests/overlays/production` would need a
    second pass. Its CRD is; right after an install it may not be served yet, hence the wait.
    With mandatory peering, kopf would refuse to start without the object.
    """
    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()  # type: ignore[no-untyped-call]
    objects = kubernetes.client.CustomObjectsApi()
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ClusterKopfPeering",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "npuswarm"}},
    }
    deadline = time.monotonic() + timeout
    while True:
        try:
            objects.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)
            return False
        except kubernetes.client.ApiException as error:
            if error.status != 404:
                raise PeeringUnavailableError(
                    f"reading {PLURAL}/{name}: {error.status} {error.reason}"
                ) from error
        try:
            objects.create_cluster_custom_object(GROUP, VERSION, PLURAL, body)
            return True
        except kubernetes.client.ApiException as error:
            if error.status == 409:  # another replica created it first
                return False
            if error.status != 404 or time.monotonic() > deadline:
                raise PeeringUnavailableError(
                    f"creating {PLURAL}/{name}: {error.status} {error.reason}"
                    + (
                        " (is the CRD clusterkopfpeerings.kopf.dev installed?)"
                        if error.status == 404
                        else ""
                    )
                ) from error
        # 404 on create: the CRD is not served yet (installed in the same apply).
        time.sleep(interval)
