"""The root key Secret on the real kube-apiserver, with the operator's ServiceAccount (the
RBAC of manifests/): with NPUSWARM_ROOT_KEY empty, the first operator start creates
`npuswarm-root-key` in its namespace, later starts read the same key and never rewrite it,
and two starts racing to create it end with one key. Once through the startup function with
the ServiceAccount's token, once with the operator's image started twice."""

from __future__ import annotations

import base64
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest

from npuswarm.handlers import with_root_key
from npuswarm.kube import ROOT_KEY_SECRET, Kube, root_key
from npuswarm.settings import Settings

from tests.e2e.conftest import (
    OPERATOR_NAMESPACE,
    Cluster,
    _answers,
    free_port,
    operator_image,
    operatorimage,
)
from tests.helpers import wait_for

pytestmark = pytest.mark.e2e


def operator_kube(cluster: Cluster) -> Kube:
    """A client as the operator's ServiceAccount, as a fresh operator start makes one."""
    client = kubernetes.config.new_client_from_config(config_file=str(cluster.operator_kubeconfig))
    return Kube(api_client=client)


def version(cluster: Cluster) -> str:
    return cluster.kubectl("-n", OPERATOR_NAMESPACE, "get", "secret", ROOT_KEY_SECRET,
                           "-o", "jsonpath={.metadata.resourceVersion}").stdout.strip()


@pytest.fixture
def no_secret(cluster: Cluster) -> Iterator[None]:
    def delete() -> None:
        cluster.kubectl("-n", OPERATOR_NAMESPACE, "delete", "secret", ROOT_KEY_SECRET,
                        "--ignore-not-found", "--wait")

    delete()
    yield
    delete()


@pytest.mark.usefixtures("no_secret")
def test_a_fresh_install_gets_a_root_key_and_every_later_start_reads_the_same(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POD_NAMESPACE", OPERATOR_NAMESPACE)
    first = with_root_key(Settings(), operator_kube(cluster))
    key = first.root_key.get_secret_value()
    assert len(key) == 64 and int(key, 16) >= 0, "32 random bytes, hex"
    made = version(cluster)

    again = with_root_key(Settings(), operator_kube(cluster))
    assert again.root_key.get_secret_value() == key
    assert version(cluster) == made, "a second start does not rewrite the Secret"

    # An admin's key wins, and the Secret is left as it is.
    admin = with_root_key(Settings(root_key="an-admin-key-0123456789"), operator_kube(cluster))
    assert admin.root_key.get_secret_value() == "an-admin-key-0123456789"
    assert version(cluster) == made


@pytest.mark.usefixtures("no_secret")
def test_two_starts_racing_to_create_it_hold_one_key(cluster: Cluster) -> None:
    kubes = [operator_kube(cluster) for _ in range(2)]
    found: list[str] = []
    barrier = threading.Barrier(2)

    def start(kube: Kube) -> None:
        barrier.wait()
        found.append(root_key(kube, OPERATOR_NAMESPACE))

    threads = [threading.Thread(target=start, args=(kube,)) for kube in kubes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(found) == 2 and found[0] == found[1], found



def run_operator(cluster: Cluster, tmp_path: Path, name: str) -> tuple[subprocess.Popen[bytes], Path]:
    """The operator's image as the Deployment runs it, with no root key given (the session
    operator's other settings, its own installation name, watching a namespace nothing uses:
    it must not serve the session's objects)."""
    env = {k: v for k, v in cluster.operator_env.items() if "ROOT_KEY" not in k}
    env |= {"NPUSWARM_METRICS_PORT": str(free_port()), "NPUSWARM_INSTANCE": "e2e-root-key",
            "POD_NAMESPACE": OPERATOR_NAMESPACE}
    health = f"http://127.0.0.1:{free_port()}/healthz"
    token = cluster.kubectl("-n", OPERATOR_NAMESPACE, "create", "token", "npuswarm",
                            "--duration=1h").stdout.strip()
    sa_dir = operatorimage.service_account_dir(tmp_path / f"sa-{name}", token,
                                               cluster.plane.ca_file)
    argv = operatorimage.docker_run_args(
        operator_image(), name, cluster.plane.server, sa_dir, env,
        ["run", "--standalone", f"--liveness={health}", "--log-format=json",
         "-n", "e2e-root-key-unused"],
    )
    log = tmp_path / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(["docker", *argv], stdout=out, stderr=subprocess.STDOUT)
    wait_for(lambda: _answers(health) or process.poll() is not None, f"{name}'s liveness",
             timeout=90)
    assert process.poll() is None, log.read_text(errors="replace")[-3000:]
    return process, log


def stop_operator(name: str, process: subprocess.Popen[bytes]) -> None:
    subprocess.run(["docker", "kill", "--signal", "TERM", name], capture_output=True, check=False)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
    subprocess.run(["docker", "rm", "--force", name], capture_output=True, check=False)


@pytest.mark.usefixtures("no_secret")
def test_two_real_operator_starts_without_a_key_make_it_once_and_read_it_after(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The operator process itself (its image, the manifests' RBAC), started twice."""
    seen = []
    for attempt in (1, 2):
        name = f"npuswarm-root-key-{attempt}-{uuid.uuid4().hex[:6]}"
        process, log = run_operator(cluster, tmp_path, name)
        try:
            wait_for(lambda: "root key from secret" in log.read_text(errors="replace")
                     or "root key secret created" in log.read_text(errors="replace"),
                     "the operator's root key", timeout=30)
            text = log.read_text(errors="replace")
            seen.append((version(cluster), text))
        finally:
            stop_operator(name, process)
    (first_version, first_log), (second_version, second_log) = seen
    assert "root key secret created" in first_log
    assert "root key secret created" not in second_log and "root key from secret" in second_log
    assert second_version == first_version, "the second start did not rewrite the Secret"
    data = cluster.kubectl("-n", OPERATOR_NAMESPACE, "get", "secret", ROOT_KEY_SECRET,
                           "-o", "jsonpath={.data.root-key}").stdout.strip()
    key = base64.b64decode(data).decode()
    assert len(key) == 64 and key not in first_log + second_log, "the key is never logged"
