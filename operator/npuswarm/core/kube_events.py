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
    _pruned_at: float | None = None

    def admit(self, obj: str, event: Event, now: float | None = None) -> bool:
        moment = time.monotonic() if now is None else now
        self._prune(moment)
        key = (obj, event.reason, event.message)
        sent = self._last_sent.get(key)
        if sent is not None and moment - sent < self.window_seconds:
            return False
        self._last_sent[key] = moment
        return True

    def _prune(self, moment: float) -> None:
        """Drop entries whose window has passed: a deployment that lives for months and
        changes messages (each with a node, an NPU count, an error text) would otherwise
        keep every key it ever had. Once per window, so admit stays O(1) on average."""
        if self._pruned_at is not None and moment - self._pruned_at < self.window_seconds:
            return
        self._pruned_at = moment
        expired = [k for k, sent in self._last_sent.items() if moment - sent >= self.window_seconds]
        for key in expired:
            del self._last_sent[key]

    def __len__(self) -> int:
        return len(self._last_sent)

    def forget(self, obj: str) -> None:
        for key in [k for k in self._last_sent if k[0] == obj]:
            del self._last_sent[key]
