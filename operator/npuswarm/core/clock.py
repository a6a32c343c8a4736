"""Time, defined once: now in UTC, the one timestamp format npuswarm writes (conditions,
Events), and the parser of the timestamps Docker and kopf's peering objects write. Pure."""

from __future__ import annotations

import functools
from datetime import UTC, datetime

# Kubernetes' timestamp form (metav1.Time): conditions' lastTransitionTime, Events' times.
TIMESTAMP = "%Y-%m-%dT%H:%M:%SZ"
# Docker Engine durations (health checks, restart delays) are in nanoseconds.
SECOND_NS = 1_000_000_000
# A task without a readable time sorts before every real one.
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


@functools.lru_cache(maxsize=8)
def timestamp(now: datetime) -> str:
    # One pass stamps thousands of conditions with the same instant.
    return now.strftime(TIMESTAMP)


def parse_engine_time(text: str | None) -> datetime | None:
    """Docker's RFC 3339 times (``2024-05-01T10:00:00.123456789Z``) and kopf's peering
    ``lastseen``, as aware UTC datetimes; None when absent or unreadable."""
    if not text:
        return None
    # Docker prints nanoseconds; fromisoformat takes at most microseconds.
    head, dot, tail = text.rstrip("Z").partition(".")
    fraction = tail[:6] if dot else ""
    try:
        parsed = datetime.fromisoformat(f"{head}.{fraction.ljust(6, '0')}+00:00")
    except ValueError:
        return None
    return parsed
