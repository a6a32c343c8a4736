"""What asks for a pass: triggers mark deployments (or everything) as wanting one and wake the
pass loop; triggers that arrive together are served by one pass. Every watch holds this one
object, so none of them reaches into another's state."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from npuswarm import metrics

log = structlog.get_logger("npuswarm.runtime")


@dataclass
class Triggers:
    stop: threading.Event = field(default_factory=threading.Event)
    # kopf's event loop: the pass loop runs there; other threads hand triggers over to it.
    loop: asyncio.AbstractEventLoop | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    # Set when Swarm answers again after an outage: the backoff ends at once.
    recovery: asyncio.Event = field(default_factory=asyncio.Event)
    dirty: set[str] = field(default_factory=set)
    everything: bool = True  # the first pass serves every deployment
    # Passes that failed in a row (a Swarm outage): the pass loop backs off by it.
    failures: int = 0
    # When the oldest trigger not yet served arrived (monotonic): how long a pass kept it waiting.
    since: float | None = None

    def request(
        self, key: str | None = None, *, everything: bool = False, recovered: bool = False
    ) -> None:
        """Ask for a pass (in the event loop's thread). ``key``: the deployment that wants
        it; ``everything``: serve every deployment (resync, node change); ``recovered``:
        Swarm answers again, so the outage backoff ends."""
        if recovered:
            self.failures = 0
            self.recovery.set()
        if everything:
            self.everything = True
        elif key is not None:
            self.dirty.add(key)
        if self.since is None:
            self.since = time.monotonic()
        metrics.workqueue_depth.labels(metrics.CONTROLLER).set(len(self.dirty))
        self.wake.set()

    def request_threadsafe(
        self, key: str | None = None, *, everything: bool = False, recovered: bool = False
    ) -> None:
        if self.loop is not None and not self.stop.is_set():
            self.loop.call_soon_threadsafe(
                lambda: self.request(key, everything=everything, recovered=recovered)
            )

    def request_later(self, seconds: float, keys: list[str | None]) -> None:
        """Ask for a pass for each of ``keys`` in ``seconds`` (in the event loop's thread)."""
        assert self.loop is not None
        self.loop.call_later(seconds, self._request_each, keys)

    def _request_each(self, keys: list[str | None]) -> None:
        for key in keys:
            self.request(key)

    def take(self) -> tuple[set[str], bool]:
        """What the next pass serves: the deployments that asked, and whether everything did."""
        served, everything = set(self.dirty), self.everything
        if self.since is not None:
            metrics.pass_phase_seconds.labels("waited").observe(time.monotonic() - self.since)
            self.since = None
        self.dirty.clear()
        self.everything = False
        metrics.workqueue_depth.labels(metrics.CONTROLLER).set(0)
        return served, everything


def survive(name: str, body: Callable[[], None], stop: threading.Event) -> Callable[[], None]:
    """Run ``body`` until ``stop``; any exception is counted, logged and retried with backoff."""

    def loop() -> None:
        failures = 0
        while not stop.is_set():
            started = time.monotonic()
            try:
                body()
            except Exception as error:
                metrics.background_errors_total.labels(name).inc()
                log.warning("background loop failed; retrying", loop=name, error=repr(error))
                failures = 0 if time.monotonic() - started > 60 else failures + 1
                stop.wait(min(30.0, 0.5 * 2**failures))
            else:
                if not stop.is_set():
                    stop.wait(1.0)

    return loop
