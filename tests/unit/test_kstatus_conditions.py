"""kstatus's Reconciling and Stalled next to npuswarm's Ready, Progressing and Degraded.

The verdicts they give in kstatus itself (and in Argo CD's health.lua) are checked over real
objects in tests/packaging/test_kstatus_verdicts.py; these are the derivation's own rules.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from npuswarm.api.deployment import ModelDeploymentStatus
from npuswarm.api.meta import Condition
from npuswarm.core.status import (
    SWARM_UNAVAILABLE_STALLS_AFTER,
    ConditionValue,
    conditions,
    invalid_spec_status,
    kstatus_conditions,
    outage_since,
    timestamp,
    unavailable_status,
)

from .builders import NOW

READY = ConditionValue("True", "AllReplicasReady", "2/2 replicas ready")
NOT_READY = ConditionValue("False", "ReplicasNotReady", "0/2 replicas ready")
STARTING = ConditionValue("True", "ReplicasStarting", "waiting for tasks to run")
COMPLETE = ConditionValue("False", "Complete", "all replicas run the current spec")
FINE = ConditionValue("False", "AsExpected")
NO_NPUS = ConditionValue("True", "InsufficientNPUs", "replica 1: needs 8 free NPUs")
ERROR = "list_nodes: connection refused"


def by_type(found: list[Condition]) -> dict[str, Condition]:
    return {c.type: c for c in found}


def as_previous(status: ModelDeploymentStatus) -> dict[str, Any]:
    return status.model_dump(mode="json", exclude_none=True)


@pytest.mark.parametrize(
    ("ready", "progressing", "degraded", "reconciling", "stalled"),
    [
        (READY, COMPLETE, FINE, ("False", "AllReplicasReady"), ("False", "AsExpected")),
        (NOT_READY, STARTING, FINE, ("True", "ReplicasStarting"), ("False", "AsExpected")),
        (NOT_READY, COMPLETE, FINE, ("True", "ReplicasNotReady"), ("False", "AsExpected")),
        (NOT_READY, ConditionValue("False", "Stalled"), NO_NPUS, ("False", "Stalled"),
         ("True", "InsufficientNPUs")),
        # Degraded wins over a rollout still under way, as it does in health.lua.
        (NOT_READY, ConditionValue("True", "RollingOut"), NO_NPUS, ("False", "Stalled"),
         ("True", "InsufficientNPUs")),
    ],
)
def test_stalled_exactly_when_degraded_else_reconciling_until_ready(
    ready: ConditionValue, progressing: ConditionValue, degraded: ConditionValue,
    reconciling: tuple[str, str], stalled: tuple[str, str],
) -> None:
    derived = kstatus_conditions(ready, progressing, degraded)
    assert (derived["Reconciling"].status, derived["Reconciling"].reason) == reconciling
    assert (derived["Stalled"].status, derived["Stalled"].reason) == stalled


def test_stalled_says_why_with_the_degraded_message() -> None:
    stalled = kstatus_conditions(NOT_READY, COMPLETE, NO_NPUS)["Stalled"]
    assert stalled.message == NO_NPUS.message


def test_every_status_carries_all_five_conditions_for_its_generation() -> None:
    values = {"Ready": READY, "Progressing": COMPLETE, "Degraded": FINE}
    found = conditions(values, [], 7, NOW)
    assert [c.type for c in found] == ["Ready", "Progressing", "Degraded", "Reconciling", "Stalled"]
    assert {c.observedGeneration for c in found} == {7}


def test_invalid_spec_is_stalled_with_the_validation_error() -> None:
    status = invalid_spec_status(4, "spec.npusPerReplica: Input should be 1, 2, 4 or 8", {}, NOW)
    found = by_type(status.conditions)
    assert (found["Stalled"].status, found["Stalled"].reason) == ("True", "InvalidSpec")
    assert "npusPerReplica" in found["Stalled"].message
    assert found["Reconciling"].status == "False"
    assert {c.observedGeneration for c in status.conditions} == {4} == {status.observedGeneration}


def test_swarm_outage_reconciles_for_a_while_then_stalls() -> None:
    first = unavailable_status(2, ERROR, {}, NOW)
    found = by_type(first.conditions)
    assert (found["Reconciling"].status, found["Reconciling"].reason) == ("True", "SwarmUnavailable")
    assert found["Reconciling"].message == ERROR
    assert found["Stalled"].status == "False" and found["Degraded"].status == "Unknown"
    assert first.phase == "Progressing"

    almost = NOW + SWARM_UNAVAILABLE_STALLS_AFTER - timedelta(seconds=1)
    still = by_type(unavailable_status(2, ERROR, as_previous(first), almost).conditions)
    assert still["Stalled"].status == "False" and still["Reconciling"].status == "True"

    lasting = unavailable_status(2, ERROR, as_previous(first), NOW + SWARM_UNAVAILABLE_STALLS_AFTER)
    found = by_type(lasting.conditions)
    assert (found["Stalled"].status, found["Stalled"].reason, found["Stalled"].message) == (
        "True", "SwarmUnavailable", ERROR)
    assert (found["Degraded"].status, found["Reconciling"].status) == ("True", "False")
    assert lasting.phase == "Degraded"
    # The start of the outage is kept, so later passes stay Stalled instead of starting over.
    assert found["Ready"].lastTransitionTime == timestamp(NOW)
    later = by_type(unavailable_status(2, ERROR, as_previous(lasting), NOW + timedelta(hours=1)).conditions)
    assert later["Stalled"].status == "True"


def test_outage_counts_from_when_ready_turned_unknown_only() -> None:
    ready_before = [{"type": "Ready", "status": "True", "reason": "AllReplicasReady",
                     "lastTransitionTime": "2020-01-01T00:00:00Z"}]
    assert outage_since(ready_before, NOW) == NOW
    unreadable = [{"type": "Ready", "status": "Unknown", "reason": "SwarmUnavailable",
                   "lastTransitionTime": "yesterday"}]
    assert outage_since(unreadable, NOW) == NOW
    future = [{"type": "Ready", "status": "Unknown", "reason": "SwarmUnavailable",
               "lastTransitionTime": timestamp(NOW + timedelta(hours=1))}]
    assert outage_since(future, NOW) == NOW
