"""Watching Swarm between passes: its event stream (services, nodes), a cheap poll of the tasks
it wants running (the stream has no task events), and the ping that tells whether the
manager is reachable. Each only asks for a pass; the pass reads Swarm itself."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import structlog

from npuswarm.reconcile import PassResult
from npuswarm.runtime.leadership import LeadershipWatch
from npuswarm.runtime.triggers import Triggers
from npuswarm.settings import Settings
from npuswarm.swarm import Swarm, SwarmUnavailable, stream_errors

log = structlog.get_logger("npuswarm.runtime")

# A Swarm event about a service this operator wrote so recently is its own echo.
ECHO_SECONDS = 5.0


class SwarmWatch:
    def __init__(
        self,
        swarm: Swarm,
        settings: Settings,
        triggers: Triggers,
        leadership: LeadershipWatch,
    ) -> None:
        self.swarm = swarm
        self.settings = settings
        self.triggers = triggers
        self.leadership = leadership
        self.owner_of_service: dict[str, str] = {}  # service id -> owner, as of the last pass
        self.tasks_seen: dict[str, str] = {}  # task id -> state, last pass
        self.service_of_task: dict[str, str] = {}  # task id -> service id
        self.recent_writes: dict[str, float] = {}  # service name -> monotonic
        self.busy = False  # the last pass left work under way: poll tasks faster
        self.event_stream: Any = None  # the open Swarm event stream: closing it ends its thread

    def saw_pass(self, result: PassResult) -> None:
        """What the pass just did and saw: its writes (their events are echoes), the owners
        of the services it saw and their tasks' states (a poll that finds the same states
        asks for no pass)."""
        now = time.monotonic()
        self.recent_writes = {
            name: when for name, when in self.recent_writes.items() if now - when < ECHO_SECONDS
        }
        for action in result.all_applied():
            self.recent_writes[action.service_name] = now
        services = result.plan.snapshot.services
        self.owner_of_service = {s.id: s.deployment for s in services}
        self.tasks_seen = {t.id: t.state for s in services for t in s.tasks}
        self.service_of_task = {t.id: s.id for s in services for t in s.tasks}

    def set_busy(self, busy: bool) -> None:
        self.busy = busy

    def close(self) -> None:
        if self.event_stream is not None:
            self.event_stream.close()

    def follow_events(self) -> None:
        """Swarm's service and node events start a pass within about a second."""
        stream = self.swarm.event_stream()
        self.event_stream = stream
        try:
            # A pass right after (re)connecting covers whatever happened while disconnected.
            self.triggers.request_threadsafe(everything=True)
            for event in stream:
                if self.triggers.stop.is_set():
                    return
                self._on_event(event)
        except stream_errors as error:
            raise SwarmUnavailable(f"event stream: {error}") from error
        finally:
            stream.close()

    def _on_event(self, event: Mapping[str, Any]) -> None:
        actor = event.get("Actor") or {}
        attributes = actor.get("Attributes") or {}
        if event.get("Type") == "node":
            if not self._own_label_echo(actor.get("ID", ""), attributes):
                self.triggers.request_threadsafe(everything=True)
            return
        name = attributes.get("name", "")
        written = self.recent_writes.get(name)
        if written is not None and time.monotonic() - written < ECHO_SECONDS:
            return
        self.triggers.request_threadsafe(self.owner_of_service.get(actor.get("ID", "")))

    def _own_label_echo(self, node_id: str, attributes: Mapping[str, Any]) -> bool:
        """A node event that changes no state, availability or role (Swarm names those in
        its attributes; a label change has only the name) right after this operator
        labelled that node for its agent. At a fleet's first start each of a thousand label
        writes asked for a whole pass, and those passes starved the writes themselves."""
        if set(attributes) - {"name"}:
            return False
        written = self.swarm.labelled_at.get(node_id)
        return written is not None and time.monotonic() - written < ECHO_SECONDS

    def poll_tasks(self) -> None:
        """Docker's event stream has no task events: a cheap list of the tasks Swarm wants
        running notices a task failing or becoming ready, faster while work is under way.
        npuswarm's tasks are compared with what the last pass saw (a change a pass has not
        seen yet asks for one); others' with the previous poll (a foreign task moving may move
        the NPUs it holds)."""
        stop = self.triggers.stop
        # Tasks of services the last pass did not know yet (it just created them) land here
        # too, so a new replica's first states also ask for a pass.
        foreign_before: dict[str, tuple[str, str]] = {}
        own_before: dict[str, str] = {}
        while not stop.is_set():
            settings = self.settings
            interval = settings.task_poll_busy_seconds if self.busy else settings.task_poll_seconds
            if stop.wait(interval):
                return
            if not self.leadership.leader:
                continue
            states = self.swarm.task_states()
            owners = self.owner_of_service
            own = {t: state for t, (service, state) in states.items() if service in owners}
            unseen = unseen_tasks(own, self.tasks_seen, own_before)
            for task in unseen:
                service = states[task][0] if task in states else self.service_of_task.get(task)
                self.triggers.request_threadsafe(owners.get(service or ""))
            if unseen:
                log.info("task states changed", tasks=len(unseen))
            own_before = own
            foreign = {t: v for t, v in states.items() if v[0] not in owners}
            if foreign != foreign_before:
                self.triggers.request_threadsafe(None)
            foreign_before = foreign

    def ping(self) -> None:
        """Reachability goes into a metric, not liveness: restarting the operator would not
        bring Docker back, and a restart loop would hide the real problem."""
        stop = self.triggers.stop
        while not stop.is_set():
            before = self.swarm.reachable
            reachable = self.swarm.ping()
            if before is not None and reachable != before:
                # Lost: a pass reports the outage in every status. Back: recover now rather
                # than at the end of the backoff.
                self.triggers.request_threadsafe(everything=True, recovered=reachable)
            if stop.wait(self.settings.swarm_probe_seconds):
                return


def unseen_tasks(
    own: Mapping[str, str], seen: Mapping[str, str], before: Mapping[str, str]
) -> list[str]:
    """npuswarm's tasks (id -> state) whose state is new both to the last pass (``seen``) and
    to the previous poll (``before``): a difference that stays (a task the pass cannot see the
    same way) asks for a pass once, not on every poll."""
    return sorted(
        task
        for task in own.keys() | seen.keys()
        if own.get(task) != seen.get(task) and own.get(task) != before.get(task)
    )
