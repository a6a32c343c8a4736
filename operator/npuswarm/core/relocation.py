"""Replicas that keep failing where they are: move them, with backoff, and avoid what they left.

Swarm restarts a failed task on the same node (npuswarm pins every replica there), so a
replica whose node is the problem (a broken driver, a missing file, a bad chip) fails
forever. From the task history the pass observes, these pure functions count each replica's
failures in a row of its current spec on its current placement; at K the replica is moved,
preferring another node; the node it left is avoided by that replica for a cool-down; each
further move waits twice as long; and after a few moves the replica stays and is reported as
failing with its last error, rather than moved forever.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

import structlog

from npuswarm.api import labels
from npuswarm.core.kube_events import Event
from npuswarm.core.nodes import NodeLimits
from npuswarm.core.placement import ReplicaKey
from npuswarm.core.snapshot import ObservedService, ObservedTask, SwarmSnapshot

log = structlog.get_logger("npuswarm.failing")

FAILED = frozenset({"failed", "rejected"})
# A task in one of these states ended the streak: it ran (or ran to completion).
SUCCEEDED = frozenset({"running", "complete"})


@dataclass(frozen=True)
class Streak:
    failures: int
    last_error: str | None


def failure_streak(service: ObservedService) -> Streak:
    """Failures in a row, newest first, of tasks started from the service's current spec on
    its current node; tasks still starting neither count nor break the streak."""
    node = service.labels.get(labels.NODE)
    tasks = sorted(
        (t for t in service.tasks if _current(service, t) and (node is None or t.node_id == node)),
        key=lambda t: (t.created, t.id),
        reverse=True,
    )
    count, last_error = 0, None
    for task in tasks:
        if task.state in SUCCEEDED:
            break
        if task.state in FAILED:
            count += 1
            last_error = last_error or task.error
    return Streak(count, last_error)


def _current(service: ObservedService, task: ObservedTask) -> bool:
    return task.spec_hash is None or task.spec_hash == service.spec_hash


@dataclass(frozen=True)
class History:
    """What npuswarm did to one replica because it failed: moves so far, the last one's
    time, and the nodes it avoids until when."""

    moves: int = 0
    last_move: datetime | None = None
    avoid: Mapping[str, datetime] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    move: dict[ReplicaKey, str]  # replica -> why it moves now
    avoid: dict[ReplicaKey, frozenset[str]]  # replica -> nodes it must not go to now
    failing: dict[ReplicaKey, str]  # replicas left where they are although failing: why
    histories: dict[ReplicaKey, History]


def decide(
    services: Iterable[ObservedService],
    histories: Mapping[ReplicaKey, History],
    now: datetime,
    *,
    threshold: int,
    backoff_seconds: float,
    cooldown_seconds: float,
    max_moves: int,
    hostnames: Mapping[str, str] | None = None,
) -> Decision:
    """Which replicas move now, which nodes each avoids, and the updated histories."""
    names = hostnames or {}
    move: dict[ReplicaKey, str] = {}
    failing: dict[ReplicaKey, str] = {}
    kept: dict[ReplicaKey, History] = {}
    for service in services:
        allocation = service.allocation()
        if allocation is None:
            continue
        key = allocation.key
        history = histories.get(key, History())
        streak = failure_streak(service)
        if threshold <= 0 or streak.failures < threshold:
            settled = (
                streak.failures == 0
                and history.last_move is not None
                and now - history.last_move > timedelta(seconds=cooldown_seconds)
            )
            # Running again for a cool-down: a later failure starts from scratch.
            kept[key] = History(avoid=history.avoid) if settled else history
            continue
        host = names.get(allocation.node_id, allocation.node_id)
        why = f"failed {streak.failures} times in a row on node {host}: {streak.last_error or '?'}"
        if history.moves >= max_moves:
            failing[key] = f"{why}; not moved again after {history.moves} moves"
            kept[key] = history
            continue
        wait = backoff_seconds * 2 ** max(0, history.moves - 1) if history.moves else 0.0
        if history.last_move is not None and now - history.last_move < timedelta(seconds=wait):
            kept[key] = history
            continue
        move[key] = why
        avoid = dict(history.avoid)
        avoid[allocation.node_id] = now + timedelta(seconds=cooldown_seconds)
        kept[key] = History(moves=history.moves + 1, last_move=now, avoid=avoid)
    # Replicas not seen this pass (their deployment gone, or not created yet) keep only a
    # cool-down still running.
    for key, history in histories.items():
        if key not in kept and any(until > now for until in history.avoid.values()):
            kept[key] = history
    avoiding: dict[ReplicaKey, frozenset[str]] = {}
    for key, history in kept.items():
        live = {node: until for node, until in history.avoid.items() if until > now}
        if live != dict(history.avoid):
            kept[key] = replace(history, avoid=live)
        if live:
            avoiding[key] = frozenset(live)
    return Decision(move=move, avoid=avoiding, failing=failing, histories=kept)


@dataclass(frozen=True)
class RelocationRules:
    """When a failing replica moves (the NPUSWARM_FAILING_REPLICA_* settings): after
    ``threshold`` failures in a row (0: never), each further move ``backoff_seconds`` doubled,
    the node left avoided for ``cooldown_seconds``, at most ``max_moves`` moves."""

    threshold: int
    backoff_seconds: float
    cooldown_seconds: float
    max_moves: int


class FailureTracker:
    """The histories across passes; ``checks`` adds its decision to the pass's NodeLimits."""

    def __init__(self, rules: RelocationRules, clock: Callable[[], datetime]) -> None:
        self.rules = rules
        self.clock = clock
        self.histories: dict[ReplicaKey, History] = {}
        self._reported: dict[ReplicaKey, str] = {}

    def decide(self, snapshot: SwarmSnapshot) -> Decision:
        rules = self.rules
        decision = decide(
            snapshot.services,
            self.histories,
            self.clock(),
            threshold=rules.threshold,
            backoff_seconds=rules.backoff_seconds,
            cooldown_seconds=rules.cooldown_seconds,
            max_moves=rules.max_moves,
            hostnames={n.id: n.hostname for n in snapshot.nodes},
        )
        self.histories = decision.histories
        for key, why in decision.move.items():
            log.warning("failing replica moves", deployment=key[0], replica=key[1], why=why)
        for key, why in decision.failing.items():
            if self._reported.get(key) != why:
                log.warning("failing replica stays", deployment=key[0], replica=key[1], why=why)
        self._reported = dict(decision.failing)
        return decision

    def events(self) -> dict[str, list[Event]]:
        """Per deployment, a Warning for each replica left where it is although failing (the
        runtime posts them with the pass's other events; identical ones once an hour)."""
        found: dict[str, list[Event]] = {}
        for (deployment, slot), why in sorted(self._reported.items()):
            found.setdefault(deployment, []).append(
                Event("Warning", "ReplicaFailing", f"replica {slot}: {why}")
            )
        return found

    def checks(
        self, first: Callable[[SwarmSnapshot], NodeLimits] | None
    ) -> Callable[[SwarmSnapshot], NodeLimits]:
        """``first``'s limits (node validation, NPU health) plus this tracker's moves."""

        def combined(snapshot: SwarmSnapshot) -> NodeLimits:
            base = first(snapshot) if first is not None else NodeLimits()
            decision = self.decide(snapshot)
            return replace(base, move=decision.move, avoid=decision.avoid)

        return combined
