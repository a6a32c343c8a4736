"""Fixtures for tests against the multi-node Swarm lab (hack/lib/swarmlab.py).

The lab is real: dockerds in network namespaces, a Swarm, the runtime shim, the fake vLLM
image. Nothing here is mocked. If the lab cannot start, every test using it errors: no skip.
"""

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from docker.types import (
    ContainerSpec,
    EndpointSpec,
    NetworkAttachmentConfig,
    Placement,
    RestartPolicy,
    TaskTemplate,
)

import swarmlab
from npuswarm.nodehealth import agents
from npuswarm.settings import Settings
from tests.helpers import wait_for

REPO = Path(__file__).resolve().parents[2]
LAB_NAME = os.environ.get("NPUSWARM_TEST_LAB_NAME", "npsltest")
# The operator's root key in tests that run node agents (their credential derives from it).
ROOT_KEY = "lab-root-key-0123456789abcdef"
TASK_TIMEOUT = 60.0


# Overlay networks the lab tests make by hand (test_npuswarm_on_lab.py, test_gateway.py).
LAB_NETWORKS = ("npuswarm-lab-net", "npuswarm-gw-net")


def lab_settings(**overrides: Any) -> Settings:
    """The operator's settings on the lab: npuswarm did not create the tests' networks, so,
    as an admin does for a network made by hand, they are shared (NPUSWARM_SHARED_NETWORKS)
    with the namespaces the tests use; test_tenants.py checks the refusal without it."""
    shared = ",".join(f"{network}=*" for network in LAB_NETWORKS)
    return Settings(**{"shared_networks": shared, **overrides})


def tear_down(reconciler: Any, deployments: list[Any], gateway: str = "gw") -> None:
    """What a lab test's operator leaves behind: each deployment's services (by its
    finalizer), the lab gateway's, then the Reconciler's threads."""
    for md in deployments:
        reconciler.finalize(md.metadata.namespace, md.metadata.name, md.metadata.uid)
    reconciler.finalize_gateway("lab", gateway)
    reconciler.close()


def agent_settings(operator_image: str, grace: float) -> Settings:
    """Node checks as the node-agent tests run them: agents from the operator's image, read
    every second, a failed node re-checked every 3 s, ``grace`` before an unhealthy NPU's
    replica moves."""
    return Settings(
        root_key=ROOT_KEY,
        agent_image=operator_image,
        npu_health_seconds=1.0,
        node_recheck_failed_seconds=3.0,
        npu_unhealthy_grace_seconds=grace,
    )


@pytest.fixture(scope="session")
def swarm_lab():
    """A 3-node lab (node1 manager; node3 910A-style with rings of 4) for the session."""
    # With the manager on TCP+TLS too (test_docker_tls.py): a few ms of openssl, no extra node.
    with swarmlab.lab_session(nodes=3, npus=8, rings_node=True, name=LAB_NAME, tls=True) as lab:
        yield lab


@pytest.fixture(scope="session")
def manager(swarm_lab):
    """docker SDK client of the Swarm manager."""
    return swarm_lab.client(1)


@pytest.fixture
def services(manager):
    """Creates fake vLLM services for one test and removes them (and its networks) after it."""
    made = Services(manager)
    yield made
    made.remove_all()


class Services:
    def __init__(self, client) -> None:
        self.client = client
        self.ids: list[str] = []
        self.networks: list = []

    def network(self, name: str):
        net = self.client.networks.create(name, driver="overlay", attachable=True)
        self.networks.append(net)
        return net

    def fake_vllm(
        self,
        name: str,
        node_id: str,
        args: list[str],
        env: dict | None = None,
        published_port: int | None = None,
        network=None,
        aliases=None,
    ) -> str:
        """One service = one replica pinned to one node, as npuswarm renders them. The image is
        never resolved against a registry: the SDK's create_service does not, and dockerd runs
        with DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1."""
        spec = ContainerSpec(swarmlab.IMAGE, command=["vllm"], args=["serve", *args], env=env or {})
        networks = [NetworkAttachmentConfig(network.id, aliases=aliases or [])] if network else None
        template = TaskTemplate(
            spec,
            restart_policy=RestartPolicy(condition="none"),
            networks=networks,
            placement=Placement(constraints=[f"node.id=={node_id}"]),
        )
        ports = {published_port: (8000, "tcp", "host")} if published_port else None
        endpoint = EndpointSpec(mode="dnsrr", ports=ports)
        service_id = self.client.api.create_service(template, name=name, endpoint_spec=endpoint)[
            "ID"
        ]
        self.ids.append(service_id)
        return service_id

    def tasks(self, service_id: str) -> list[dict]:
        return self.client.api.tasks(filters={"service": service_id})

    def wait_task_state(
        self, service_id: str, states: set[str], timeout: float = TASK_TIMEOUT
    ) -> dict:
        """Poll until a task of the service reaches one of `states`; return that task."""

        def reached():
            return next((t for t in self.tasks(service_id) if t["Status"]["State"] in states), None)

        try:
            return swarmlab.wait_for(reached, f"a task of {service_id} in {sorted(states)}", timeout)
        except swarmlab.LabError as exc:
            raise AssertionError(
                f"{exc}; tasks: {[t['Status'] for t in self.tasks(service_id)]}"
            ) from None

    def remove_all(self) -> None:
        for service_id in self.ids:
            self.client.api.remove_service(service_id)
        # Networks can only go once their tasks are gone, which takes a moment.
        for net in self.networks:
            swarmlab.wait_for(
                lambda net=net: remove_network(net), f"network {net.name} to be removable", 30
            )


def remove_network(net) -> bool:
    import docker

    try:
        net.remove()
    except docker.errors.NotFound:
        return True
    except docker.errors.APIError:
        return False
    return True


def ask_from_client_container(manager, network: str, url: str, count: int) -> list[dict]:
    """Run fakevllm-client `count` times against `url` from a container on `network`.

    Returns its JSON lines: one per request, then one with the summary.
    """
    command = ["fakevllm-client", "--count", str(count), "--timeout", "60", url]
    client = manager.containers.run(swarmlab.IMAGE, command, network=network, detach=True)
    try:
        exit_code = client.wait(timeout=90)["StatusCode"]
        output = client.logs(stdout=True, stderr=False).decode()
    finally:
        client.remove(force=True)
    assert exit_code == 0, output
    return [json.loads(line) for line in output.splitlines()]


@pytest.fixture(scope="session")
def operator_image(swarm_lab) -> str:
    """hack/build-image's image, loaded into every lab node (no registry here)."""
    built = subprocess.run(
        [str(REPO / "hack" / "build-image")], capture_output=True, text=True, check=False
    )
    if built.returncode != 0:
        pytest.fail(f"hack/build-image failed:\n{built.stderr[-3000:]}")
    tag = built.stdout.strip().splitlines()[-1]
    swarm_lab.load_image(tag)
    return tag


@pytest.fixture
def agents_removed(swarm_lab):
    """Each test starts its agents itself (a node's runtime switch is read at container
    creation) and leaves none behind."""
    api = swarm_lab.client(1).api

    def remove() -> None:
        for service in api.services(filters={"label": agents.AGENT}):
            api.remove_service(service["ID"])
        wait_for(
            lambda: not [
                c
                for k in (1, 2, 3)
                for c in swarm_lab.client(k).api.containers(
                    filters={"label": "com.docker.swarm.service.name"}
                )
                if c["Labels"].get("com.docker.swarm.service.name", "").startswith("npuswarm-agent")
            ],
            "agent containers gone",
            timeout=30,
        )
        for secret in api.secrets(filters={"label": agents.AGENT}):
            api.remove_secret(secret["ID"])

    remove()
    yield
    remove()


@pytest.fixture(scope="session")
def gateway_image(swarm_lab: swarmlab.Lab) -> str:
    """hack/build-gateway-image's image, loaded into every lab node (no registry here)."""
    built = subprocess.run(
        [str(REPO / "hack" / "build-gateway-image"), "--save"], capture_output=True, text=True
    )
    if built.returncode != 0:
        pytest.fail(f"hack/build-gateway-image --save failed:\n{built.stderr[-3000:]}")
    tarball = Path(built.stdout.strip())
    tag = "npuswarm-gateway:" + tarball.stem.rsplit("-", 1)[1]
    for node in swarm_lab.nodes:
        client = swarmlab.docker_client(node.endpoint, timeout=300)
        if not client.images.list(name=tag):
            with tarball.open("rb") as data:
                client.images.load(data)
    return tag


def service_container(swarm_lab: swarmlab.Lab, service: str) -> Any:
    """The running container of a one-replica service, on whichever lab node it runs."""
    for index in range(1, len(swarm_lab.nodes) + 1):
        found = swarm_lab.client(index).containers.list(
            filters={"label": f"com.docker.swarm.service.name={service}"}
        )
        if found:
            return found[0]
    raise AssertionError(f"no running container of {service}")
