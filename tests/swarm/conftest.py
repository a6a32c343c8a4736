"""Integration tests against a real dockerd in Swarm mode (hack/local-swarm up).

They fail, never skip, when no Swarm answers: CI must not pass without exercising Docker.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import docker
import pytest

from npuswarm.api import ModelDeployment
from npuswarm.reconcile import DeploymentView, Desired, Reconciler
from npuswarm.settings import Settings
from npuswarm.swarm import Swarm

IMAGE = os.environ.get("NPUSWARM_TEST_IMAGE", "npuswarm/tiny-vllm:dev")
NETWORK = "npuswarm-test-net"
T = TypeVar("T")


def wait_for(condition: Callable[[], T], what: str, timeout: float = 60.0, interval: float = 0.3) -> T:
    """Poll until ``condition`` returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last: T = condition()
    while not last:
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(interval)
        last = condition()
    return last


@pytest.fixture(scope="session")
def docker_client() -> docker.APIClient:
    try:
        client = docker.APIClient(version="auto")
        info = client.info()
    except Exception as error:  # noqa: BLE001 - any failure means the same: no Swarm
        pytest.fail(f"no dockerd answers ({error}): run `hack/local-swarm up` first")
    if info.get("Swarm", {}).get("LocalNodeState") != "active":
        pytest.fail("dockerd is not in Swarm mode: run `hack/local-swarm up` first")
    if not client.images(name=IMAGE):
        pytest.fail(f"image {IMAGE} is missing: run `hack/local-swarm up` first")
    if not client.networks(names=[NETWORK]):
        client.create_network(NETWORK, driver="overlay", attachable=True)
    return client


@pytest.fixture
def namespace(docker_client: docker.APIClient) -> Iterator[str]:
    """A namespace of one's own, and every service it created removed afterwards."""
    name = f"t{uuid.uuid4().hex[:8]}"
    yield name
    for service in docker_client.services(filters={"label": f"npuswarm.io/owner-namespace={name}"}):
        docker_client.remove_service(service["ID"])


@pytest.fixture
def reconciler(docker_client: docker.APIClient) -> Reconciler:
    return Reconciler(Swarm(), Settings(lost_node_grace_seconds=5))


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


def model(namespace: str, name: str, created: str = "2026-01-01T00:00:00Z", **spec: Any) -> ModelDeployment:
    body = fast_spec(name)
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    return ModelDeployment.model_validate(
        {
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": f"uid-{namespace}-{name}",
                "generation": 1,
                "creationTimestamp": created,
            },
            "spec": body,
        }
    )


def serve(
    reconciler: Reconciler, md: ModelDeployment, everyone: list[ModelDeployment], status: dict[str, Any]
) -> DeploymentView:
    """One pass over ``everyone`` (md's freshest copy among them); md's view of it."""
    deployments = [md, *(other for other in everyone if other.key != md.key)]
    result = reconciler.run_pass(Desired(deployments=deployments, previous={md.key: status}))
    return result.views[md.key]


def converge(
    reconciler: Reconciler, md: ModelDeployment, everyone: list[ModelDeployment] | None = None,
    timeout: float = 90.0,
) -> DeploymentView:
    """Run passes like the operator does until the deployment reports Ready."""
    status: dict[str, Any] = {}

    def ready() -> DeploymentView | None:
        nonlocal status
        view = serve(reconciler, md, everyone or [md], status)
        status = view.status.model_dump(mode="json")
        return view if view.status.phase == "Ready" else None

    return wait_for(ready, f"{md.key} to become Ready", timeout=timeout, interval=0.5)
