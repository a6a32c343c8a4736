"""The node-check loop (docs/node-health.md): keeps the node agents and reads them through
nodehealth/runner.py; a verdict or reading that changes asks for a pass, which places on a
node that passed or stops placing on one that failed."""

from __future__ import annotations

from npuswarm.nodehealth.runner import SETTLE_POLL_SECONDS, NodeChecker
from npuswarm.runtime.leadership import LeadershipWatch
from npuswarm.runtime.triggers import Triggers
from npuswarm.settings import Settings


class NodeCheckLoop:
    def __init__(
        self,
        checker: NodeChecker,
        settings: Settings,
        triggers: Triggers,
        leadership: LeadershipWatch,
    ) -> None:
        self.checker = checker
        self.settings = settings
        self.triggers = triggers
        self.leadership = leadership

    def run(self) -> None:
        """A step at once, then every task poll interval; every second while the agents
        are coming up (NodeChecker.settling), since no replica goes to a node before its
        agent answered; and when an unhealthy NPU's grace ends."""
        stop = self.triggers.stop
        while not stop.is_set():
            if self.leadership.leader and self.checker.step():
                self.triggers.request_threadsafe(everything=True)
            settling = self.checker.settling()
            wait = SETTLE_POLL_SECONDS if settling else self.settings.task_poll_seconds
            grace_end = self.checker.next_grace_end()
            if grace_end is not None:
                # An unhealthy NPU's replica moves when its grace ends, not a poll later.
                wait = min(wait, grace_end + 0.05)
            if stop.wait(wait):
                return
