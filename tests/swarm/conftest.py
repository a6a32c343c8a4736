"""Integration tests against a real dockerd in Swarm mode (hack/local-swarm up).

They fail, never skip, when no Swarm answers: CI must not pass without exercising Docker.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from npuswarm.api.deployment import ModelDeployment
from npuswarm.reconcile import Reconciler
from npuswarm.core.pipeline import DeploymentView, Desired
from npuswarm.settings import Settings
from npuswarm.swarm import Swarm
from tests.helpers import IMAGE, NETWORK, SHARED_NETWORKS, fast_spec, wait_for

__all__ = ["IMAGE", "NETWORK", "converge", "fast_spec", "model", "swarm_settings", "wait_for"]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test of this suite needs the Swarm: marked here, so a new file cannot miss it."""
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.swarm)


@pytest.fixture(scope="session")
def docker_client() -> docker.APIClient:
    try:
        client = docker.APIClient(version="auto")
        info = client.info()
    except Exception as error:
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


def swarm_settings() -> Settings:
    """The operator's settings for these tests: the test network shared, lost nodes soon."""
    return Settings(lost_node_grace_seconds=5, shared_networks=SHARED_NETWORKS, stop_grace_seconds=STOP_GRACE_SECONDS)


# The tiny stand-in (busybox httpd) ignores SIGTERM, so a removed replica runs until Swarm's
# SIGKILL at the end of its stop grace; its NPUs are given out only once it has exited
# (docs/priority.md), so with the 120 s default the next test would wait two minutes for them.
STOP_GRACE_SECONDS = 2


@pytest.fixture
def reconciler(docker_client: docker.APIClient) -> Reconciler:
    return Reconciler(Swarm(), swarm_settings())


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
