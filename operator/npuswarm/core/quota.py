"""Namespace NPU quotas: a cap on the NPUs one namespace's deployments may hold. Pure.

The cluster admin sets it as the annotation ``npuswarm.io/npu-quota`` on the Namespace
object (docs/priority.md says why there and not on a ModelDeployment or in a setting: a
namespace's users can edit their ModelDeployments but, with the usual RBAC, not their
Namespace; and a setting would need the operator restarted for every change).

Placement asks ``Quotas.admit`` which replica requests it may place at all (step 2 of the
pass). Within a namespace that has a quota, replicas are admitted while their NPUs fit it:
first those that run now, so a new replica never stops a running one, then the others; each
group in the pass's order (priority, then age). A replica beyond the quota is not placed
(QuotaExceeded, the status says by how much); one that runs beyond it (the quota was
lowered) stops. A multi-node replica counts the NPUs of all its nodes, all or none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from npuswarm.api.meta import split_key
from npuswarm.core.placement import (
    Admission,
    Allocation,
    PlacementResult,
    ReplicaKey,
    ReplicaRequest,
    Unplaced,
)

ANNOTATION = "npuswarm.io/npu-quota"
# The largest quota one annotation may set (more NPUs than any fleet has).
MAX_QUOTA = 10**6


def parse_quota(value: object) -> int | None:
    """The annotation's value as a count of NPUs; None when it is not a whole number from 0
    to MAX_QUOTA (an unreadable quota is reported and ignored: see ``problems``)."""
    text = str(value).strip()
    if not text.isdigit():
        return None
    quota = int(text)
    return quota if quota <= MAX_QUOTA else None


@dataclass(frozen=True)
class Quotas:
    """Each namespace's NPU quota (namespaces without one are not capped)."""

    npus: Mapping[str, int] = field(default_factory=dict)
    # Namespaces whose annotation could not be read -> its text (no cap: reported).
    problems: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_annotations(cls, annotations: Mapping[str, Mapping[str, str]]) -> Quotas:
        """From each namespace's annotations (namespace -> annotations)."""
        npus: dict[str, int] = {}
        problems: dict[str, str] = {}
        for namespace, found in annotations.items():
            if ANNOTATION not in found:
                continue
            quota = parse_quota(found[ANNOTATION])
            if quota is None:
                problems[namespace] = str(found[ANNOTATION])[:64]
            else:
                npus[namespace] = quota
        return cls(npus, problems)

    def admit(self, requests: list[ReplicaRequest], allocations: Sequence[Allocation]) -> Admission:
        """The requests placement may place (in the order given), the others unplaced."""
        if not self.npus:
            return Admission(list(requests))
        running = {a.key for a in allocations if not a.foreign and not a.stopping}
        units: dict[ReplicaKey, list[ReplicaRequest]] = {}
        for request in requests:
            unit = request.group_key or request.key
            units.setdefault(unit, []).append(request)
        used: dict[str, int] = {}
        admitted_units: set[ReplicaKey] = set()
        capped = [u for u in units if _namespace(u[0]) in self.npus]
        # Running replicas first, then new ones: a new replica never displaces a running one.
        for wave in (True, False):
            for unit in capped:
                members = units[unit]
                if all(m.key in running for m in members) != wave:
                    continue
                namespace = _namespace(unit[0])
                cost = sum(m.npus for m in members)
                if used.get(namespace, 0) + cost <= self.npus[namespace]:
                    used[namespace] = used.get(namespace, 0) + cost
                    admitted_units.add(unit)
        admission = Admission(admitted=[])
        for request in requests:
            unit = request.group_key or request.key
            namespace = _namespace(request.deployment)
            if namespace not in self.npus or unit in admitted_units:
                admission.admitted.append(request)
                continue
            quota = self.npus[namespace]
            message = (
                f"namespace {namespace} has an NPU quota of {quota} ({ANNOTATION}); "
                f"{used.get(namespace, 0)} are given to its replicas and this one needs "
                f"{sum(m.npus for m in units[unit])}"
            )
            admission.refused[request.key] = Unplaced(
                deployment=request.deployment,
                slot=request.slot,
                reason="QuotaExceeded",
                message=message,
            )
            if request.key in running:
                admission.evicted[request.key] = f"beyond the NPU quota: {message}"
        admission.room = {ns: quota - used.get(ns, 0) for ns, quota in self.npus.items()}
        return admission


def _namespace(deployment: str) -> str:
    return split_key(deployment)[0]


class QuotaRoom:
    """What the namespaces' quotas leave for the autoscaler's headroom (core/autoscale.py):
    a scale-up never asks for a replica its namespace's quota refuses."""

    def __init__(self, placement: PlacementResult) -> None:
        self.placement = placement
        self.left = dict(placement.quota_room)

    def cap(self, deployment: str, requests: list[ReplicaRequest], more: int) -> int:
        """At most ``more`` replicas: those already admitted but waiting, then what the
        namespace's room holds."""
        namespace = _namespace(deployment)
        if namespace not in self.left or not requests:
            return more
        waiting = self._admitted_waiting(requests)
        return min(more, waiting + self.left[namespace] // max(1, requests[0].npus))

    def spend(self, deployment: str, requests: list[ReplicaRequest], fitted: int) -> None:
        namespace = _namespace(deployment)
        if namespace in self.left and requests:
            beyond = max(0, fitted - self._admitted_waiting(requests))
            self.left[namespace] -= beyond * requests[0].npus

    def _admitted_waiting(self, requests: list[ReplicaRequest]) -> int:
        unplaced = self.placement.unplaced
        return sum(
            1 for r in requests if r.key in unplaced and unplaced[r.key].reason != "QuotaExceeded"
        )
