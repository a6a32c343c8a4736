from __future__ import annotations

from datetime import UTC, datetime

from npuswarm.peering import is_active

NOW = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)


def peer(priority: int, lastseen: str = "2026-11-30T11:59:50Z", lifetime: int = 60) -> dict[str, object]:
    return {"priority": priority, "lastseen": lastseen, "lifetime": lifetime}


def test_alone_or_highest_is_active() -> None:
    assert is_active({}, "me", 100, NOW)
    assert is_active({"me": peer(100), "other": peer(50)}, "me", 100, NOW)


def test_a_live_higher_or_equal_peer_pauses_this_one() -> None:
    assert not is_active({"me": peer(100), "other": peer(200)}, "me", 100, NOW)
    assert not is_active({"me": peer(100), "other": peer(100)}, "me", 100, NOW)


def test_dead_peers_do_not_count() -> None:
    stale = peer(200, lastseen="2026-11-30T11:50:00Z", lifetime=60)
    assert is_active({"me": peer(100), "gone": stale}, "me", 100, NOW)
