"""Shared test helpers: repo paths, and small builders for pure-unit inputs."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A test that uses one of these fixtures needs what the marker names; without the marker,
# `pytest -m "not lab"` and friends would select tests that cannot run there.
MARKER_OF_FIXTURE = {
    "docker_client": "swarm",
    "cluster": "e2e",
    "binaries": "e2e",
    "plane": "e2e",
    "swarm_lab": "lab",
}


@pytest.hookimpl(trylast=True)  # after the suites' conftests have marked their items
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wrong = []
    for item in items:
        needed = {MARKER_OF_FIXTURE[f] for f in getattr(item, "fixturenames", ()) if f in MARKER_OF_FIXTURE}
        have = {m.name for m in item.iter_markers()}
        wrong += [f"{item.nodeid}: needs @pytest.mark.{m}" for m in sorted(needed - have)]
    if wrong:
        raise pytest.UsageError("tests without the marker of what they need:\n" + "\n".join(wrong))
