"""Helpers every suite shares, in one place with hack/lib/localrun.py (the wait helper, free
ports, stopping a process, the operator's command line: also used by bench/ and hack/):

- `wait_for(condition, what, timeout=...)` is localrun's, with a timeout turned into a test
  failure and exceptions from `condition` propagating (a test's check that raises is a bug,
  not "not yet");
- `free_port` and `stop_process` are localrun's;
- the fast spec, and metric samples.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

import localrun
from localrun import free_port, stop_process

__all__ = ["IMAGE", "NETWORK", "fast_spec", "free_port", "sample", "stop_process", "wait_for"]

IMAGE = os.environ.get("NPUSWARM_TEST_IMAGE", "npuswarm/tiny-vllm:dev")
NETWORK = "npuswarm-test-net"
# The tests make NETWORK and the examples' vllm-net by hand and use them from many namespaces:
# as an admin does for networks npuswarm did not create, the operator shares them with all.
SHARED_NETWORKS = f"{NETWORK}=*,vllm-net=*"
T = TypeVar("T")


def wait_for(condition: Callable[[], T], what: str, timeout: float = 60.0, interval: float = 0.3) -> T:
    """Poll until ``condition`` returns something truthy; fail with ``what`` at the deadline."""
    try:
        return localrun.wait_for(condition, what, timeout, interval, retry=())
    except localrun.ToolError as error:
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
