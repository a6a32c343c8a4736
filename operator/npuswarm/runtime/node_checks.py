"""The node-check loop (docs/node-health.md): runs node checks and npu-smi readings through
nodehealth/runner.py; a verdict or reading that changes asks for a pass, which places on a
node that passed or stops placing on one that failed."""

from __future__ import annotations

from npuswarm.core.pipeline import Desired
from npuswarm.nodehealth.runner import NodeChecker
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
        # (nodeSelector, image) of every deployment, oldest first, as of the last pass.
        self.wanted: list[tuple[dict[str, str], str]] = []

    def saw_pass(self, desired: Desired) -> None:
        """Read by the loop's thread: swapped whole, never edited in place."""
        self.wanted = [
            (md.spec.nodeSelector, md.spec.image)
            for md in sorted(
                desired.deployments, key=lambda md: (md.metadata.creationTimestamp or "~", md.key)
            )
        ]

    def run(self) -> None:
        stop = self.triggers.stop
        while not stop.is_set():
            if stop.wait(self.settings.task_poll_seconds):
                return
            if not self.leadership.leader:
                continue
            if self.checker.step(self.wanted):
                self.triggers.request_threadsafe(everything=True)
