"""End-to-end fixtures: a real kube-apiserver + etcd (hack/lib/controlplane.py), the manifests
installed with `kubectl apply -k`, and the operator image (hack/build-image) run as the
Deployment runs it (hack/lib/operatorimage.py): non-root, read-only, with the ServiceAccount's
token mounted where in-cluster config finds it, so RBAC that is too narrow fails these tests.

The operator reaches Docker through a TCP relay owned by the test session, so a test can cut
the Swarm off (and restore it) without touching the dockerd other tests use.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml

import controlplane
import operatorimage
from tests.faultproxy import FaultProxy
from tests.helpers import NETWORK, SHARED_NETWORKS, fast_spec, free_port, stop_process, wait_for

REPO = Path(__file__).resolve().parents[2]

OPERATOR_NAMESPACE = "npuswarm-system"
SERVICE_ACCOUNT = f"system:serviceaccount:{OPERATOR_NAMESPACE}:npuswarm"


INSTANCE = f"e2e{uuid.uuid4().hex[:8]}"


# The operator's Docker connection: a relay a test can switch off, or make slow and faulty.
DockerRelay = FaultProxy


@dataclass
class Cluster:
    plane: controlplane.ControlPlane
    operator_kubeconfig: Path
    metrics_url: str
    health_url: str
    relay: FaultProxy
    operator: subprocess.Popen[bytes]
    log_path: Path
    docker: docker.APIClient
    namespaces: list[str] = field(default_factory=list)
    # How the operator container was started, so a test can SIGKILL it and start it again.
    container: str = ""
    run_argv: list[str] = field(default_factory=list)
    # The operator's environment, for tests that start more operators of this installation.
    operator_env: dict[str, str] = field(default_factory=dict)

    def kubectl(self, *args: str, check: bool = True, input: str | None = None,
                kubeconfig: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        argv = [str(self.plane.kubectl), "--kubeconfig", str(kubeconfig or self.plane.kubeconfig), *args]
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr}{result.stdout}")
        return result

    def get(self, namespace: str, name: str) -> dict[str, Any]:
        out = self.kubectl("-n", namespace, "get", "md", name, "-o", "json").stdout
        return json.loads(out)

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            return response.read().decode()

    def operator_log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill_operator(self) -> None:
        """SIGKILL the operator process (no shutdown handler runs), as a node crash or the
        OOM killer would, and wait until its container is gone."""
        subprocess.run(["docker", "kill", "--signal", "KILL", self.container],
                       capture_output=True, check=False, timeout=30)
        self.operator.wait(timeout=30)
        subprocess.run(["docker", "rm", "--force", self.container], capture_output=True,
                       check=False, timeout=30)

    def start_operator(self) -> None:
        """Start the operator again with the same arguments (its log appended) and wait for
        its liveness endpoint."""
        with self.log_path.open("ab") as log:
            self.operator = subprocess.Popen(["docker", *self.run_argv], stdout=log,
                                             stderr=subprocess.STDOUT)
        wait_for(lambda: _answers(self.health_url) or self.operator.poll() is not None,
                 "the restarted operator's liveness endpoint", timeout=60)
        if self.operator.poll() is not None:
            pytest.fail(f"operator exited: {self.operator_log()[-3000:]}", pytrace=False)


def operator_image() -> str:
    """$NPUSWARM_OPERATOR_IMAGE (hack/test builds it first), else what hack/build-image
    builds or finds for this checkout's sources."""
    explicit = os.environ.get("NPUSWARM_OPERATOR_IMAGE")
    if explicit:
        return explicit
    built = subprocess.run([str(REPO / "hack" / "build-image")], capture_output=True, text=True,
                           check=False, timeout=900)
    if built.returncode != 0:
        pytest.fail(f"hack/build-image failed:\n{built.stderr[-3000:]}", pytrace=False)
    return built.stdout.strip().splitlines()[-1]


def deployment_args(plane: controlplane.ControlPlane, health_port: int) -> list[str]:
    """The container arguments of manifests/' Deployment, its liveness endpoint moved from
    0.0.0.0:8080 to a free loopback port (the container shares the host's network)."""
    rendered = subprocess.run([str(plane.kubectl), "kustomize", str(REPO / "manifests")],
                              capture_output=True, text=True, check=True, timeout=60).stdout
    (deployment,) = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    liveness = "--liveness=http://0.0.0.0:8080/healthz"
    assert liveness in container["args"], container["args"]
    return [f"--liveness=http://127.0.0.1:{health_port}/healthz" if a == liveness else a
            for a in container["args"]]


def write_kubeconfig(path: Path, plane: controlplane.ControlPlane, token: str) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {"server": plane.server, "certificate-authority": str(plane.ca_file)}}],
        "users": [{"name": "npuswarm", "user": {"token": token}}],
        "contexts": [{"name": "npuswarm", "context": {"cluster": "local", "user": "npuswarm"}}],
        "current-context": "npuswarm",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    try:
        controlplane.binaries()
    except controlplane.BinariesMissingError as error:
        pytest.fail(str(error), pytrace=False)
    client = docker.APIClient(version="auto")
    try:
        client.info()
    except Exception as error:
        pytest.fail(f"no dockerd answers ({error}): run `hack/local-swarm up` first", pytrace=False)
    if not client.networks(names=[NETWORK]):
        client.create_network(NETWORK, driver="overlay", attachable=True)
    if not client.networks(names=["vllm-net"]):
        client.create_network("vllm-net", driver="overlay", attachable=True)

    state = tmp_path_factory.mktemp("e2e")
    with controlplane.running(state / "controlplane") as plane:
        admin = Cluster(plane, Path(), "", "", DockerRelay(), None, Path(), client)  # type: ignore[arg-type]
        admin.kubectl("apply", "-k", str(REPO / "manifests"))
        admin.kubectl("wait", "--for=condition=Established", "crd/modeldeployments.npuswarm.io", "--timeout=60s")
        token = admin.kubectl("-n", OPERATOR_NAMESPACE, "create", "token", "npuswarm", "--duration=2h").stdout.strip()
        operator_kubeconfig = state / "operator.kubeconfig"
        write_kubeconfig(operator_kubeconfig, plane, token)

        relay = DockerRelay()
        relay.start()
        metrics_port, health_port = free_port(), free_port()
        log_path = state / "operator.log"
        env = {
            "DOCKER_HOST": relay.url,
            # Far beyond any test: every reaction must come from a trigger (kopf, Swarm events,
            # the task poll), not from the safety-net resync.
            "NPUSWARM_RESYNC_SECONDS": "600",
            "NPUSWARM_LOST_NODE_GRACE_SECONDS": "5",
            "NPUSWARM_METRICS_PORT": str(metrics_port),
            "NPUSWARM_SWARM_PROBE_SECONDS": "1",
            "NPUSWARM_DOCKER_TIMEOUT_SECONDS": "5",
            # This session's own installation: services of other sessions sharing the
            # developer's dockerd are foreign to it (never swept as orphans).
            "NPUSWARM_INSTANCE": INSTANCE,
            "NPUSWARM_GATEWAY_ROOT_KEY": GATEWAY_ROOT_KEY,
            "NPUSWARM_SHARED_NETWORKS": SHARED_NETWORKS,
            # The local Swarm runs plain runc with no stand-in Ascend runtime: validation
            # would (rightly) refuse its node. tests/lab covers node validation.
            "NPUSWARM_NODE_VALIDATION": "false",
            # One node: a failing replica could only move to other NPUs of the same node,
            # which would rewrite services tests expect unchanged. tests/lab covers moves.
            "NPUSWARM_FAILING_REPLICA_THRESHOLD": "0",
            # Multi-node replicas (host network) in the tests' namespaces (test_multinode_status).
            "NPUSWARM_HOST_NETWORK_NAMESPACES": "*",
            # The tiny stand-in ignores SIGTERM: a removed replica would hold its NPUs for the
            # whole stop grace (120 s by default), and they are given out only once it has
            # exited (docs/priority.md), so each test would wait for the last one's.
            "NPUSWARM_STOP_GRACE_SECONDS": "2",
        }
        container = f"npuswarm-e2e-{uuid.uuid4().hex[:8]}"
        sa_dir = operatorimage.service_account_dir(state / "serviceaccount", token, plane.ca_file)
        argv = operatorimage.docker_run_args(
            operator_image(), container, plane.server, sa_dir, env,
            deployment_args(plane, health_port),
        )
        with log_path.open("wb") as log:
            # `docker run` in the foreground: a signal to it stops the container (--rm).
            operator = subprocess.Popen(["docker", *argv], stdout=log, stderr=subprocess.STDOUT)
        result = Cluster(
            plane=plane,
            operator_kubeconfig=operator_kubeconfig,
            metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
            health_url=f"http://127.0.0.1:{health_port}/healthz",
            relay=relay,
            operator=operator,
            log_path=log_path,
            docker=client,
            container=container,
            run_argv=argv,
            operator_env=env,
        )
        try:
            wait_for(lambda: _answers(result.health_url) or operator.poll() is not None,
                     "the operator's liveness endpoint", timeout=60)
            if operator.poll() is not None:
                pytest.fail(f"operator exited: {result.operator_log()[-3000:]}", pytrace=False)
            yield result
        finally:
            stop_process(result.operator)  # a test may have restarted it
            subprocess.run(["docker", "rm", "--force", container], capture_output=True, check=False)
            relay.stop()
            for namespace in result.namespaces:
                for service in client.services(filters={"label": f"npuswarm.io/owner-namespace={namespace}"}):
                    client.remove_service(service["ID"])
            print(result.operator_log()[-5000:])


GATEWAY_ROOT_KEY = "e2e-gateway-root-key-0123456789"


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """A namespace per test; its ModelDeployments are deleted afterwards (through the
    finalizer), so the next test finds every NPU free again."""
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    cluster.namespaces.append(name)
    yield name
    cluster.kubectl("-n", name, "delete", "md", "--all", "--timeout=90s", check=False, timeout=120)


def manifest(name: str, **spec: Any) -> str:
    body = fast_spec(name)
    body.update(spec)
    return yaml.safe_dump({"apiVersion": "npuswarm.io/v1alpha1", "kind": "ModelDeployment",
                           "metadata": {"name": name}, "spec": body})


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), {})


def wait_md(cluster: Cluster, namespace: str, name: str, check: Callable[[dict[str, Any]], bool],
            what: str, timeout: float = 90) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        result = cluster.kubectl("-n", namespace, "get", "md", name, "-o", "json", check=False)
        if result.returncode != 0:
            return None
        obj: dict[str, Any] = json.loads(result.stdout)
        return obj if check(obj) else None

    try:
        return wait_for(probe, f"{namespace}/{name}: {what}", timeout=timeout, interval=0.5)
    except pytest.fail.Exception:
        print(cluster.operator_log()[-4000:])
        raise


def is_ready(obj: dict[str, Any]) -> bool:
    status = obj.get("status", {})
    return (
        condition(obj, "Ready").get("status") == "True"
        and status.get("observedGeneration") == obj["metadata"]["generation"]
    )


__all__ = ["Cluster", "condition", "is_ready", "manifest", "time", "wait_md"]
