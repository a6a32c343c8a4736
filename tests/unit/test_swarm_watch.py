"""The task poll between passes (runtime/swarm_watch.py) against what the last pass saw."""

from __future__ import annotations

import threading
from typing import Any

from npuswarm.core.pipeline import Desired
from npuswarm.reconcile import Reconciler
from npuswarm.runtime.swarm_watch import SwarmWatch
from npuswarm.runtime.triggers import Triggers
from npuswarm.settings import Settings
from tests.helpers import wait_for

from .builders import NOW, deployment
from .memswarm import MemorySwarm


class Recorded(Triggers):
    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str | None] = []

    def request_threadsafe(self, key: str | None = None, **_: Any) -> None:
        self.asked.append(key)


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
