"""The root key Secret on the real kube-apiserver, with the operator's ServiceAccount (the
RBAC of manifests/): with NPUSWARM_ROOT_KEY empty, the first operator start creates
`npuswarm-root-key` in its namespace, later starts read the same key and never rewrite it,
and two starts racing to create it end with one key."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import kubernetes
import pytest

from npuswarm.handlers import with_root_key
from npuswarm.kube import ROOT_KEY_SECRET, Kube, root_key
from npuswarm.settings import Settings

from .conftest import OPERATOR_NAMESPACE, Cluster

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

