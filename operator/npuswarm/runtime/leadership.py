"""Which operator instance acts: kopf's peering rule, read from the peering object(s). The
watch keeps ``leader`` (the gate of every pass and of the watches that ask for one) and the
npuswarm_leader gauge."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from npuswarm import metrics
from npuswarm.core.clock import utcnow
from npuswarm.peering import is_active
from npuswarm.runtime.triggers import Triggers
from npuswarm.settings import Settings

# How often the peering object is read: a standby takes over at most this long after the
# dead leader's record expires (one small GET per poll).
LEADERSHIP_POLL_SECONDS = 2.0


@dataclass
class Leadership:
    """kopf's peering settings of this instance."""

    standalone: bool
    mandatory: bool
    name: str
    priority: int
    identity: str
    namespaces: frozenset[str] | None


class PeeringReader(Protocol):
    def peering_status(self, name: str, namespace: str | None) -> dict[str, Any] | None: ...


class LeadershipWatch:
    def __init__(
        self, config: Leadership, kube: PeeringReader, settings: Settings, triggers: Triggers
    ) -> None:
        self.config = config
        self.kube = kube
        self.settings = settings
        self.triggers = triggers
        self.leader = False

    def run(self) -> None:
        """npuswarm_leader, and the gate of every pass: by kopf's own peering rule, read from
        the cluster peering object, or each watched namespace's."""
        lead, stop = self.config, self.triggers.stop
        while not stop.is_set():
            active = lead.standalone or self.active()
            if active and not self.leader:
                self.triggers.request_threadsafe(everything=True)
            self.leader = active
            metrics.leader.set(1 if active else 0)
            if stop.wait(min(self.settings.swarm_probe_seconds, LEADERSHIP_POLL_SECONDS)):
                return

    def active(self) -> bool:
        lead = self.config
        scopes: list[str | None] = [None]
        if lead.namespaces is not None:
            scopes = [*sorted(lead.namespaces)]
        now = utcnow()
        for scope in scopes:
            status = self.kube.peering_status(lead.name, scope)
            if status is None:
                # No peering object: kopf runs standalone, unless peering is mandatory.
                if lead.mandatory:
                    return False
                continue
            if not is_active(status, lead.identity, lead.priority, now):
                return False
        return True
