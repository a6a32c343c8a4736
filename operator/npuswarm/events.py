"""Kubernetes Events worth telling a person, and a filter so a stuck state is not repeated
on every resync."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

EventType = Literal["Normal", "Warning"]


@dataclass(frozen=True)
class Event:
    type: EventType
    reason: str
    message: str


@dataclass
class EventFilter:
    """Lets an identical event (same object, reason and message) through once per window."""

    window_seconds: float = 3600.0
    _last_sent: dict[tuple[str, str, str], float] = field(default_factory=dict)

    def admit(self, obj: str, event: Event, now: float | None = None) -> bool:
        moment = time.monotonic() if now is None else now
        key = (obj, event.reason, event.message)
        sent = self._last_sent.get(key)
        if sent is not None and moment - sent < self.window_seconds:
            return False
        self._last_sent[key] = moment
        return True

    def forget(self, obj: str) -> None:
        for key in [k for k in self._last_sent if k[0] == obj]:
            del self._last_sent[key]
