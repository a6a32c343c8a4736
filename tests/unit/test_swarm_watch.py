"""The task poll between passes (runtime/swarm_watch.py) against what the last pass saw."""

from __future__ import annotations

import threading
import time
from typing import Any

from npuswarm.core.pipeline import Desired
from npuswarm.reconcile import Reconciler
from npuswarm.runtime.swarm_watch import SwarmWatch
from npuswarm.runtime.triggers import Triggers
from npuswarm.settings import Settings
from npuswarm.swarm import Swarm
from tests.helpers import wait_for

from .builders import NOW, deployment
from .memswarm import MemorySwarm


class Recorded(Triggers):
    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str | None] = []
        self.everything = 0

    def request_threadsafe(self, key: str | None = None, **kwargs: Any) -> None:
        self.asked.append(key)
        self.everything += bool(kwargs.get("everything"))


class Polled:
    """task_states as Swarm answers it, from the in-memory Swarm's tasks."""

    def __init__(self, swarm: MemorySwarm) -> None:
        self.swarm = swarm
        self.polls = 0

    def task_states(self) -> dict[str, tuple[str, str]]:
        self.polls += 1
        return {
            t["ID"]: (t["ServiceID"], t["Status"]["State"])
            for t in self.swarm.tasks
            if t.get("DesiredState") == "running"
        }


class Leading:
    leader = True


def test_a_task_gone_since_the_last_pass_asks_for_a_pass_for_its_owner() -> None:
    swarm = MemorySwarm(nodes=1)
    reconciler = Reconciler(swarm, Settings(lost_node_grace_seconds=60), clock=lambda: NOW)
    md = deployment("chat", replicas=2)
    reconciler.run_pass(Desired(deployments=[md]))
    swarm.run_all()
    seen = reconciler.run_pass(Desired(deployments=[md]))
    triggers = Recorded()
    polled = Polled(swarm)
    watch = SwarmWatch(polled, Settings(task_poll_seconds=0.01), triggers, Leading())  # type: ignore[arg-type]
    watch.saw_pass(seen)
    thread = threading.Thread(target=watch.poll_tasks, daemon=True)
    thread.start()
    try:
        wait_for(lambda: polled.polls >= 2, "two polls of unchanged tasks", timeout=10)
        assert triggers.asked == []  # what the pass saw: nothing to ask
        # A scale-down removed a replica's service: its task is gone from Swarm.
        removed = swarm.by_name()["default-chat-1"]["ID"]
        swarm.tasks = [t for t in swarm.tasks if t["ServiceID"] != removed]
        wait_for(lambda: triggers.asked, "a pass asked for the owner", timeout=10)
        assert set(triggers.asked) == {md.key}
    finally:
        triggers.stop.set()
        thread.join(timeout=10)


def test_the_node_event_of_this_operators_own_label_write_asks_for_no_pass() -> None:
    """At a fleet's first start the agents' label writes (one per node) each came back as a
    node event asking for a whole pass. Only the echo of this operator's own label write is
    dropped: a state, availability or role change, another node's label or an old write
    still ask (Swarm names those changes in the event's attributes: verified on docker
    20.10, a label change carries only the node's name)."""
    swarm = Swarm(base_url="tcp://127.0.0.1:9")  # never connected: events are fed by hand
    triggers = Recorded()
    watch = SwarmWatch(swarm, Settings(), triggers, Leading())  # type: ignore[arg-type]
    swarm.labelled_at = {"n1": time.monotonic(), "old": time.monotonic() - 60}

    def node_event(node_id: str, **attributes: str) -> None:
        watch._on_event(
            {"Type": "node", "Action": "update",
             "Actor": {"ID": node_id, "Attributes": {"name": "h", **attributes}}}
        )

    node_event("n1")
    assert triggers.everything == 0, "the echo of our own label write"
    node_event("n1", **{"state.old": "ready", "state.new": "down"})
    node_event("n2")
    node_event("old")
    node_event("n1", **{"availability.old": "active", "availability.new": "drain"})
    assert triggers.everything == 4
