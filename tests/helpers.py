"""Helpers the Swarm, e2e and lab suites share: the one wait helper and the fast spec.

`wait_for(condition, what, timeout=...)` is hack/swarmlab.py's, with a timeout turned into a
test failure and exceptions from `condition` propagating (a test's probe that raises is a bug,
not "not yet").
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hack"))

import swarmlab

IMAGE = os.environ.get("NPUSWARM_TEST_IMAGE", "npuswarm/tiny-vllm:dev")
NETWORK = "npuswarm-test-net"
T = TypeVar("T")


def wait_for(condition: Callable[[], T], what: str, timeout: float = 60.0, interval: float = 0.3) -> T:
    """Poll until ``condition`` returns something truthy; fail with ``what`` at the deadline."""
    try:
        return swarmlab.wait_for(condition, what, timeout, interval, retry=())
    except swarmlab.LabError as error:
        pytest.fail(str(error), pytrace=False)


def fast_spec(name: str) -> dict[str, Any]:
    """A spec that starts in seconds on the tiny image: short health checks and restarts."""
    return {
        "image": IMAGE,
        "model": f"/models/{name}",
        "engine": {"port": 8000},
        "healthCheck": {"startPeriodSeconds": 10, "intervalSeconds": 1, "timeoutSeconds": 2},
        "network": {"name": NETWORK},
        "restartPolicy": {"delaySeconds": 1},
    }


def sample(registry: Any, name: str, **labels: str) -> float:
    """A sample's value through the public API (0 when the series does not exist yet), for
    tests that count metrics: `sample(metrics.REGISTRY, "npuswarm_swarm_api_calls_total",
    operation="list_services", outcome="ok")`."""
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)
