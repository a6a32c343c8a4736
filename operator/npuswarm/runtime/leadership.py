"""Which operator instance acts: kopf's peering rule, read from the peering object(s). The
watch keeps ``leader`` (the gate of every pass and of the watches that ask for one) and the
npuswarm_leader gauge."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import structlog

from npuswarm import metrics
from npuswarm.core.clock import utcnow
from npuswarm.peering import is_active, others_until, record_until
from npuswarm.runtime.triggers import Triggers
from npuswarm.settings import Settings

# How often the peering object is read: a standby takes over at most this long after the
# dead leader's record expires (one small GET per poll).
LEADERSHIP_POLL_SECONDS = 2.0
FAST_POLL_SECONDS = 0.5
# The lease ends this long before the instance's record expires for its peers: the clock skew
# between instances it tolerates (NTP keeps nodes within milliseconds).
LEASE_MARGIN_SECONDS = 4.0

log = structlog.get_logger("npuswarm.runtime")


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
    """Whether this instance may write to Swarm now (docs/reliability.md, "One writer").

    By kopf's peering rule, read every 2 s; and only while it holds a lease it confirmed
    itself: its own peering record's ``lastseen + lifetime`` (what its peers judge it by)
    minus LEASE_MARGIN_SECONDS, on the local monotonic clock. A read that fails does not
    extend the lease, so an instance cut off from the API server stops writing before any
    standby may take over. Every Swarm write checks ``leader`` just before it is sent (the
    Swarm client's fence), not only a pass's start. An instance that starts leading while
    another peer's record is live, or expired less than the longest write ago, first waits
    out that peer's last possible write (docker_timeout_seconds + a poll + the margin)."""

    def __init__(
        self,
        config: Leadership,
        kube: PeeringReader,
        settings: Settings,
        triggers: Triggers,
        clock: Callable[[], datetime] = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.kube = kube
        self.settings = settings
        self.triggers = triggers
        self.clock = clock
        self.monotonic = monotonic
        # kopf's rule, as last read; the lease and the hold, on the monotonic clock.
        self.active = config.standalone
        self.lease_until = float("inf") if config.standalone else 0.0
        self.hold_until = 0.0
        self._led = False
        # Until when each other instance's record counted as live, as last seen: kopf removes
        # the records of dead peers, so the one a standby must wait out may be gone already.
        self._peers: dict[str, datetime] = {}

    @property
    def leader(self) -> bool:
        """This instance acts now: kopf's rule says so, its lease holds, no hold is on."""
        if self.config.standalone:
            return True
        now = self.monotonic()
        return self.active and now < self.lease_until and now >= self.hold_until

    def run(self) -> None:
        """npuswarm_leader, and the gate of every pass and write: by kopf's own peering rule,
        read from the cluster peering object, or each watched namespace's."""
        stop = self.triggers.stop
        while not stop.is_set():
            if not self.config.standalone:
                try:
                    self.read()
                except Exception as error:
                    # The verdict stays, the lease runs out: no write past it.
                    metrics.background_errors_total.labels("leadership").inc()
                    log.warning("peering unreadable; the lease is not extended", error=repr(error))
            leading = self.leader
            if leading and not self._led:
                self.triggers.request_threadsafe(everything=True)
            self._led = leading
            metrics.leader.set(1 if leading else 0)
            if stop.wait(self._next_poll()):
                return

    def _next_poll(self) -> float:
        """Every 2 s; faster when the lease is about to end, so a renewal kopf wrote is seen
        before the lease lapses (kopf renews 5-10 s before its record expires)."""
        poll = min(self.settings.swarm_probe_seconds, LEADERSHIP_POLL_SECONDS)
        left = self.lease_until - self.monotonic()
        return FAST_POLL_SECONDS if 0 < left < LEASE_MARGIN_SECONDS + poll else poll

    def read(self) -> None:
        """One read of the peering object(s): the verdict, the lease, and a hold when this
        instance starts to lead while another might still be writing."""
        lead = self.config
        scopes: list[str | None] = [None]
        if lead.namespaces is not None:
            scopes = [*sorted(lead.namespaces)]
        asked = self.monotonic()
        now = self.clock()
        active = True
        lease = float("inf")
        for scope in scopes:
            status = self.kube.peering_status(lead.name, scope)
            if status is None:
                # No peering object: kopf runs standalone, unless peering is mandatory.
                if lead.mandatory:
                    active = False
                continue
            if not is_active(status, lead.identity, lead.priority, now):
                active = False
            own = record_until(status, lead.identity)
            # No record of its own yet (kopf writes it soon after start): from this read.
            left = (
                (own - now).total_seconds()
                if own is not None
                else float(self.settings.peering_lifetime_seconds)
            )
            lease = min(lease, asked + left - LEASE_MARGIN_SECONDS)
            for identity, until in others_until(status, lead.identity).items():
                self._peers[identity] = max(until, self._peers.get(identity, until))
        was_leading = self.leader
        self.active, self.lease_until = active, lease
        if active and not was_leading and self.monotonic() >= self.hold_until:
            wait = self.hold_seconds(now)
            if wait > 0:
                self.hold_until = self.monotonic() + wait
                log.info("leading after a peer: first write after the hold", hold_seconds=wait)

    def hold_seconds(self, now: datetime) -> float:
        """How long another instance may still be writing. A live one (lower priority, or
        this one starting beside it) stops within a poll of seeing this one, a dead one at
        its lease's end (its record's expiry minus the margin); either may have one write of
        up to the Docker timeout under way, and clocks may differ by the margin."""
        tail = self.settings.docker_timeout_seconds + LEASE_MARGIN_SECONDS
        wait = 0.0
        for identity, until in list(self._peers.items()):
            left = (until - now).total_seconds()
            if left + tail < -LEASE_MARGIN_SECONDS:
                del self._peers[identity]  # long gone: nothing of it can be under way
                continue
            wait = max(wait, (LEADERSHIP_POLL_SECONDS if left > 0 else left) + tail)
        return wait
