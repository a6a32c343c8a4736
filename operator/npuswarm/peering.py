"""Is this operator instance the active one? kopf decides, from its peering object, and exposes
no hook; this reads the same object and applies the same rule, for the npuswarm_leader gauge.

kopf's rule: an instance pauses while a live peer has a higher priority, or the same priority
(then every one of them pauses). A peer is live until lastseen + lifetime.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from npuswarm.inventory import parse_engine_time


def is_active(status: dict[str, Any], own_id: str, own_priority: int, now: datetime) -> bool:
    for identity, info in status.items():
        if identity == own_id or not isinstance(info, dict):
            continue
        seen = parse_engine_time(info.get("lastseen"))
        lifetime = timedelta(seconds=int(info.get("lifetime", 60)))
        if seen is None or seen + lifetime <= now:
            continue  # dead: kopf ignores (and cleans) it
        if int(info.get("priority", 0)) >= own_priority:
            return False
    return True
