"""The built-in autoscaler's loop (docs/autoscaling.md): every NPUSWARM_AUTOSCALER_SECONDS it
reads each autoscaled model's engine load from the ModelGateways serving it, decides every
autoscaled deployment's count (core/autoscale.py) and asks for a pass where one changed.

Deployments at zero (autoscaling.minReplicas 0) are read every ``wake_interval`` (1 s)
between those rounds, from the gateways serving them only: a request held there waits for
this loop to see it, so that wait is kept short (docs/autoscaling.md, "Scale to zero").

It runs in its own thread, outside the pass lock, from what the last pass saw (its desired
state and its placement); the pass takes the decided counts as plain input (``serve``). One
owner of the count: with spec.autoscaling set, this loop decides it and spec.replicas is
neither read nor written (a write of it is reported in the status and an Event).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from npuswarm import metrics
from npuswarm.api.deployment import AUTOSCALING_METRICS, AutoscalerStatus, ModelDeployment
from npuswarm.api.meta import split_key
from npuswarm.core import autoscale, preemption
from npuswarm.core.clock import timestamp, utcnow
from npuswarm.core.diff import PassPlan
from npuswarm.core.pipeline import Desired
from npuswarm.core.placement import by_priority
from npuswarm.core.snapshot import SwarmSnapshot
from npuswarm.gateway.load import ModelLoad

log = structlog.get_logger("npuswarm.autoscaler")

# (gateways, autoscaled deployments, snapshot) -> each deployment's load.
LoadReader = Callable[[Any, list[ModelDeployment], SwarmSnapshot], Mapping[str, ModelLoad]]
# (gateways, deployments at zero, snapshot, seconds) -> whether a request for one is held,
# answered as soon as one is (gateway/push.py Gateways.wait_for_held, a long poll).
HeldWaiter = Callable[[Any, list[ModelDeployment], SwarmSnapshot, float], bool]
# A service's name -> the states of the tasks Swarm wants running for it (swarm.py).
TaskStates = Callable[[str], list[str]]

# A replica woken from zero: its task is looked at this often until it runs (then a pass
# puts it behind the gateways at once), for at most this long.
STARTING_POLL_SECONDS = 0.2
STARTING_WATCH_SECONDS = 900.0
# Shorter than this, a long poll is not worth its request: the round comes first.
MIN_HELD_WAIT_SECONDS = 0.1


@dataclasses.dataclass
class Starting:
    """A deployment woken from zero whose replica is starting: its service (None until the
    pass that creates it) and when the watch gives up."""

    until: float
    service: str | None = None


class Autoscaler:
    def __init__(
        self,
        read_load: LoadReader | None,
        request: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
        wait_held: HeldWaiter | None = None,
        task_states: TaskStates | None = None,
    ) -> None:
        self.read_load = read_load
        self.request = request
        self.clock = clock
        self.wait_held = wait_held
        self.task_states = task_states
        # Woken from zero, replica not running yet (only with ``task_states``).
        self.starting: dict[str, Starting] = {}
        self.lock = threading.Lock()
        # What the last pass read (before the counts were put in) and planned.
        self.last_desired: Desired | None = None
        self.last_plan: PassPlan | None = None
        self.histories: dict[str, autoscale.History] = {}
        self.counts: dict[str, int] = {}
        self.statuses: dict[str, AutoscalerStatus] = {}

    # -- the pass's side ------------------------------------------------------------------

    def serve(self, desired: Desired) -> Desired:
        """The pass's input with every autoscaled deployment at its decided count (before
        the first decision: its last status.replicas, within its bounds)."""
        counts: dict[str, int] = {}
        statuses: dict[str, AutoscalerStatus] = {}
        with self.lock:
            self.last_desired = desired
            for md in desired.deployments:
                policy = md.spec.autoscaling
                if policy is None:
                    continue
                count = self.counts.get(md.key)
                previous = desired.previous.get(md.key, {})
                if count is None:
                    # A new deployment starts with a replica even if it may scale to zero:
                    # a model that cannot start says so at once, not at its first request.
                    count = _from_status(previous.get("replicas"), max(1, policy.minReplicas))
                count = max(policy.minReplicas, min(policy.maxReplicas, count))
                self.counts[md.key] = count
                status = self.statuses.get(md.key) or _first_status(
                    count, previous.get("autoscaler")
                )
                statuses[md.key] = _with_owner_note(status, md, count)
                counts[md.key] = count
            for gone in set(self.counts) - set(counts):
                self._forget(gone)
        return dataclasses.replace(
            desired,
            deployments=autoscale.with_replicas(desired.deployments, counts),
            autoscaler=statuses,
        )

    def saw_pass(self, plan: PassPlan) -> None:
        with self.lock:
            self.last_plan = plan
            for key, starting in self.starting.items():
                if starting.service is None and key in plan.plans:
                    created = [a for a in plan.plans[key].actions if a.kind == "create"]
                    if created:
                        starting.service = created[0].service_name

    # -- the loop -------------------------------------------------------------------------

    def at_zero(self) -> frozenset[str]:
        """The deployments scaled to zero: a request for one waits at a gateway."""
        with self.lock:
            return frozenset(key for key, count in self.counts.items() if count == 0)

    def tick(self, only: frozenset[str] | None = None) -> None:
        """One round: read the load, decide, ask for a pass where a count changed.
        ``only``: these deployments alone, from the gateways serving them."""
        with self.lock:
            desired, plan = self.last_desired, self.last_plan
        if desired is None or plan is None:
            return
        autoscaled = by_priority(
            [
                md
                for md in desired.deployments
                if md.spec.autoscaling and (only is None or md.key in only)
            ]
        )
        if not autoscaled:
            return
        loads: Mapping[str, ModelLoad] = {}
        if self.read_load is not None:
            loads = self.read_load(desired.gateways, autoscaled, plan.snapshot)
        now = self.clock()
        with self.lock:
            current = {md.key: self.counts.get(md.key, md.spec.replicas) for md in autoscaled}
            histories = {
                md.key: self.histories.setdefault(md.key, autoscale.History()) for md in autoscaled
            }
        inputs = {
            md.key: autoscale.Inputs(
                current=current[md.key], load=_load(loads.get(md.key)), placeable=0, now=now
            )
            for md in autoscaled
        }
        # What each would ask for with NPUs to spare, to share the free NPUs by (oldest first).
        wanted = {
            md.key: autoscale.decide(
                md.spec.autoscaling,  # type: ignore[arg-type]
                dataclasses.replace(inputs[md.key], placeable=autoscale.MAX_PLACEABLE),
                autoscale.History(list(histories[md.key].recommendations)),
            ).replicas
            for md in autoscaled
        }
        nodes = plan.limits.apply(plan.snapshot.nodes) if plan.limits else plan.snapshot.nodes
        # Only a scale-up needs the fleet's room (and it costs a walk over the placement).
        growing = any(wanted[key] > current[key] for key in wanted)
        room = {}
        if growing:
            templates = autoscale.wake_templates(autoscaled, nodes, current, wanted)
            ranks = preemption.ranks(desired.deployments)
            room = autoscale.headroom(plan.placement, nodes, wanted, templates, ranks)
        for md in autoscaled:
            policy = md.spec.autoscaling
            assert policy is not None
            decision = autoscale.decide(
                policy,
                dataclasses.replace(inputs[md.key], placeable=room.get(md.key, 0)),
                histories[md.key],
            )
            self._record(md, policy.target.metric, policy.target.value, decision)

    def _record(
        self, md: ModelDeployment, metric: str, target: float, decision: autoscale.Decision
    ) -> None:
        namespace, name = split_key(md.key)
        with self.lock:
            before = self.statuses.get(md.key)
            last_time = before.lastScaleTime if before else None
            last_message = before.lastScaleMessage if before else None
            last_reason = before.lastScaleReason if before else None
            if decision.changed:
                last_time, last_message = timestamp(utcnow()), decision.message
                last_reason = decision.reason
                self.counts[md.key] = decision.replicas
                if decision.reason == "ScaledFromZero" and self.task_states is not None:
                    self.starting[md.key] = Starting(self.clock() + STARTING_WATCH_SECONDS)
            # A reading that moved by noise only keeps the status as it was (no write).
            if _news(before, decision, target):
                self.statuses[md.key] = AutoscalerStatus(
                    desiredReplicas=decision.replicas,
                    reason=decision.reason,
                    message=decision.message,
                    metric=metric,
                    observedValue=_rounded(decision.observed),
                    targetValue=target,
                    recommendation=decision.recommendation,
                    lastScaleTime=last_time,
                    lastScaleMessage=last_message,
                    lastScaleReason=last_reason,
                )
        metrics.autoscaler_desired_replicas.labels(namespace, name).set(decision.replicas)
        metrics.autoscaler_unmet_replicas.labels(namespace, name).set(decision.unmet)
        if decision.observed is not None:
            metrics.autoscaler_observed_value.labels(namespace, name, metric).set(decision.observed)
        if decision.recommendation is not None:
            metrics.autoscaler_recommended_replicas.labels(namespace, name).set(
                decision.recommendation
            )
        if decision.changed:
            log.info(
                "autoscaled", deployment=md.key, replicas=decision.replicas, why=decision.message
            )
        if decision.changed or before is None or before.reason != decision.reason:
            self.request(md.key)

    def _forget(self, key: str) -> None:
        self.counts.pop(key, None)
        self.starting.pop(key, None)
        self.histories.pop(key, None)
        self.statuses.pop(key, None)
        namespace, name = split_key(key)
        for gauge in (
            metrics.autoscaler_desired_replicas,
            metrics.autoscaler_recommended_replicas,
            metrics.autoscaler_unmet_replicas,
        ):
            with contextlib.suppress(KeyError):
                gauge.remove(namespace, name)
        for metric in AUTOSCALING_METRICS:
            with contextlib.suppress(KeyError):
                metrics.autoscaler_observed_value.remove(namespace, name, metric)

    def run(
        self,
        stop: threading.Event,
        interval: float,
        leading: Callable[[], bool],
        wake_interval: float = 1.0,
    ) -> None:
        """The loop body for runtime.triggers.survive: rounds until ``stop``, only while
        this instance leads. Between two rounds: the deployments at zero alone, every
        ``wake_interval``, or at once when a gateway holds a request for one (``wait_held``,
        a long poll until the next round); and the task of a replica just woken from zero,
        every STARTING_POLL_SECONDS until it runs (``task_states``), so that the pass that
        puts it behind the gateways comes at once rather than at the fleet-wide task poll."""
        due = wake = self.clock()
        while not stop.is_set():
            if not leading():
                stop.wait(min(interval, wake_interval))
                continue
            if self.clock() >= due:
                due = self.clock() + interval
                self.tick()
            if self.starting:
                self.watch_starting()
                waiting = self.at_zero()
                if waiting and self.clock() >= wake:
                    wake = self.clock() + wake_interval
                    self.tick(only=waiting)
                stop.wait(min(STARTING_POLL_SECONDS, wake_interval))
                continue
            waiting = self.at_zero()
            if not waiting:
                stop.wait(min(interval, wake_interval))
                continue
            begun = self.clock()
            self.wait_for_held(waiting, due - begun)
            if not leading():  # lost while it waited: a follower decides nothing
                continue
            self.tick(only=waiting)
            if self.clock() - begun < wake_interval and self.at_zero() & waiting:
                # Answered at once yet still at zero: a request held with no NPUs to wake its
                # model on, or a front from before the long poll. The old pace, not a spin.
                stop.wait(wake_interval)

    def wait_for_held(self, waiting: frozenset[str], seconds: float) -> bool:
        """Whether a gateway serving a deployment at zero holds a request for it, waiting up
        to ``seconds`` for one (False at once without ``wait_held``)."""
        with self.lock:
            desired, plan = self.last_desired, self.last_plan
        if self.wait_held is None or desired is None or plan is None:
            return False
        if seconds < MIN_HELD_WAIT_SECONDS:
            return False
        at_zero = [md for md in desired.deployments if md.key in waiting]
        return self.wait_held(desired.gateways, at_zero, plan.snapshot, seconds)

    def watch_starting(self) -> None:
        """Each replica woken from zero: a pass as soon as its task runs (it then joins the
        gateways, which hold the requests that woke it); one filtered task list per woken
        replica, only while it starts."""
        assert self.task_states is not None
        now = self.clock()
        with self.lock:
            watched = list(self.starting.items())
        for key, starting in watched:
            if now > starting.until or self.counts.get(key, 0) == 0:
                with self.lock:
                    self.starting.pop(key, None)
                continue
            if starting.service is None:
                continue  # the pass creating it has not run yet
            if "running" in self.task_states(starting.service):
                with self.lock:
                    self.starting.pop(key, None)
                log.info("woken replica running", deployment=key, service=starting.service)
                self.request(key)


def _load(found: ModelLoad | None) -> autoscale.Load | None:
    if found is None:
        return None
    return autoscale.Load(
        found.replicas,
        found.waiting,
        found.running,
        found.kv_cache,
        found.held,
        found.idle_seconds,
    )


def _news(before: AutoscalerStatus | None, decision: autoscale.Decision, target: float) -> bool:
    """Whether a decision is worth a new status: a steady load reads a little differently
    every round, and a status PATCH per round for that is noise. So a decision that changes
    nothing but the reading, by no more than HPA's tolerance of the target, keeps the status
    (and its message) as it was; the metric npuswarm_autoscaler_observed_value has every
    reading."""
    if before is None or decision.changed:
        return True
    if (before.desiredReplicas, before.reason, before.recommendation) != (
        decision.replicas,
        decision.reason,
        decision.recommendation,
    ):
        return True
    if decision.observed is None or before.observedValue is None:
        return decision.observed != before.observedValue or before.message != decision.message
    return abs(decision.observed - before.observedValue) > autoscale.TOLERANCE * target


def _rounded(value: float | None) -> float | None:
    """Three significant digits, as the message says it."""
    return None if value is None else float(f"{value:.3g}")


def _from_status(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _first_status(count: int, previous: object) -> AutoscalerStatus:
    """Before this instance's first decision: the last scale event the status recorded."""
    last = previous if isinstance(previous, dict) else {}
    return AutoscalerStatus(
        desiredReplicas=count,
        reason="NoLoadReading",
        message="waiting for the first load reading",
        lastScaleTime=last.get("lastScaleTime")
        if isinstance(last.get("lastScaleTime"), str)
        else None,
        lastScaleMessage=last.get("lastScaleMessage")
        if isinstance(last.get("lastScaleMessage"), str)
        else None,
        lastScaleReason=last.get("lastScaleReason")
        if isinstance(last.get("lastScaleReason"), str)
        else None,
    )


def _with_owner_note(status: AutoscalerStatus, md: ModelDeployment, count: int) -> AutoscalerStatus:
    """spec.replicas written by someone else while autoscaling is set: reported, not obeyed."""
    if (
        "replicas" not in md.spec.model_fields_set
        or md.spec.replicas == count
        or "spec.replicas" in status.message
    ):
        return status
    note = (
        f"; spec.replicas={md.spec.replicas} is not obeyed: autoscaling owns the count "
        "(remove spec.autoscaling to set it by hand, or with HPA/KEDA)"
    )
    return status.model_copy(update={"message": status.message + note})
