"""Tenants on the lab, attacked as docs/security.md says they are kept apart: what one
namespace's spec may reach of a node (reserved runtime env, host paths, writes into a
read-only root), of another namespace (its network) and of a gateway (keys, rates, rotation).

Specs reach the pass the way the operator reads them: kopf's index entries through
runtime.index.IndexReader (the host policy), then Reconciler passes on the real lab with the
real gateway image. Only the keys Secret is read from a dict instead of the API server."""

from __future__ import annotations

import contextlib
import json
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

import swarmlab
from npuswarm.api.labels import OWNER_NAME, OWNER_NAMESPACE
from npuswarm.core import hostpolicy
from npuswarm.core.pipeline import Desired
from npuswarm.gateway.access import KeySet
from npuswarm.gateway.credentials import Credentials
from npuswarm.gateway.push import Gateways
from npuswarm.reconcile import PassResult, Reconciler
from npuswarm.runtime.index import IndexReader
from npuswarm.settings import Settings
from npuswarm.swarm import Swarm
from tests.helpers import wait_for

from .conftest import service_container

pytestmark = pytest.mark.lab

ROOT_KEY = "lab-tenants-root-key-0123456789"
TEAM_A, TEAM_B = "team-a", "team-b"
NET_A = "npuswarm-tenants-a"
PORT, ADMIN_PORT = 18200, 18201
OLD_KEY, NEW_KEY = "sk-tenant-old-0123456789", "sk-tenant-new-0123456789"


class SecretKeys:
    """The keys Secret as kube.SecretKeys serves it: its data and resourceVersion."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.version = "1"

    def keys(self, namespace: str, name: str) -> KeySet | None:
        return KeySet.from_secret_data(self.data, self.version)


class Tenants:
    """kopf's index as the operator holds it, read by the operator's IndexReader, and passes
    on the lab until a condition holds."""

    def __init__(self, reconciler: Reconciler, reader: IndexReader) -> None:
        self.reconciler = reconciler
        self.reader = reader
        self.index: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.gateways: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.reader.index = self.index
        self.reader.gateway_index = self.gateways
        self.last: PassResult | None = None

    def apply(self, namespace: str, name: str, spec: dict[str, Any], generation: int = 1) -> None:
        metadata = {"namespace": namespace, "name": name, "uid": f"uid-{namespace}-{name}",
                    "generation": generation,
                    "creationTimestamp": f"2026-02-0{len(self.index) + 1}T00:00:00Z"}
        self.index[(namespace, name)] = [{"metadata": metadata, "spec": spec}]

    def apply_gateway(self, namespace: str, name: str, spec: dict[str, Any]) -> None:
        metadata = {"namespace": namespace, "name": name, "uid": f"uid-gw-{namespace}-{name}",
                    "generation": 1}
        self.gateways[(namespace, name)] = [{"metadata": metadata, "spec": spec}]

    def desired(self) -> Desired:
        return self.reader.desired({}, {})

    def converge(
        self, check: Callable[[PassResult], bool], what: str, timeout: float = 120
    ) -> PassResult:
        def done() -> PassResult | None:
            self.last = self.reconciler.run_pass(self.desired())
            return self.last if check(self.last) else None

        return wait_for(done, what, timeout=timeout, interval=0.5)

    def services_of(self, namespace: str, name: str) -> list[dict[str, Any]]:
        return self.reconciler.swarm.services_labelled(
            f"{OWNER_NAMESPACE}={namespace}", f"{OWNER_NAME}={name}"
        )


def model_spec(network: str, **extra: Any) -> dict[str, Any]:
    return {
        "image": swarmlab.IMAGE,
        "model": "/models/tenant",
        "servedModelName": "tenant-chat",
        "healthCheck": {"startPeriodSeconds": 20, "intervalSeconds": 1, "timeoutSeconds": 2},
        "network": {"name": network},
        "restartPolicy": {"delaySeconds": 1},
        **extra,
    }


def ready(result: PassResult, key: str) -> bool:
    view = result.views.get(key)
    return view is not None and view.status.phase == "Ready"


def refused(result: PassResult, key: str) -> str:
    """The message of a refused deployment's Ready=False condition, or ''."""
    view = result.views.get(key)
    if view is None:
        return ""
    found = [c for c in view.status.conditions if c.reason == hostpolicy.REASON]
    return found[0].message if found else ""


@pytest.fixture(scope="module")
def models_root() -> Iterator[Path]:
    """A read-only root for weights: the lab's dockerds share this host's filesystem."""
    with tempfile.TemporaryDirectory(prefix="npuswarm-tenants-") as root:
        (Path(root) / "weights.bin").write_bytes(b"weights")
        yield Path(root)


@pytest.fixture(scope="module")
def keys() -> SecretKeys:
    return SecretKeys()


@pytest.fixture(scope="module")
def tenants(swarm_lab: swarmlab.Lab, models_root: Path, keys: SecretKeys) -> Iterator[Tenants]:
    # The admin's settings: weights under models_root, read-only; nothing reserved allowed;
    # no network shared between namespaces.
    settings = Settings(gateway_root_key=ROOT_KEY, allowed_host_paths=(str(models_root),))
    reconciler = Reconciler(
        Swarm(base_url=swarm_lab.endpoint),
        settings,
        gateways=Gateways(
            settings.instance,
            Credentials(ROOT_KEY, settings.instance),
            policy=settings.tenant_policy(),
            keys=keys,
        ),
    )
    made = Tenants(reconciler, IndexReader(settings.tenant_policy(), None))
    try:
        yield made
    finally:
        for (namespace, name), entries in made.index.items():
            reconciler.finalize(namespace, name, entries[0]["metadata"]["uid"])
        for namespace, name in made.gateways:
            reconciler.finalize_gateway(namespace, name)
        reconciler.close()
        api = swarm_lab.client(1).api
        for network in api.networks(names=[NET_A]):
            # Still in use by a task being removed: left for the lab's teardown.
            with contextlib.suppress(docker.errors.APIError):
                api.remove_network(network["Id"])


def test_a_spec_reaching_past_the_admins_settings_starts_nothing_on_any_node(
    tenants: Tenants, models_root: Path
) -> None:
    """Ascend Docker Runtime reads ASCEND_RUNTIME_MOUNTS from the container's env: a tenant
    setting it could mount any host file. The dynamic loader reads LD_PRELOAD. Neither, nor a
    host path outside the allowed root, nor a writable mount in a read-only root, reaches a
    node: the deployment says why and has no service."""
    attacks = {
        "runtime-mounts": {"engine": {"env": {"ASCEND_RUNTIME_MOUNTS": "/etc/shadow"}}},
        "preload": {"engine": {"env": {"LD_PRELOAD": "/models/tenant/evil.so"}}},
        "outside": {"volumes": [{"hostPath": "/var/lib", "mountPath": "/models"}]},
        "writable": {"volumes": [{"hostPath": str(models_root), "mountPath": "/models",
                                  "readOnly": False}]},
    }
    for name, extra in attacks.items():
        tenants.apply(TEAM_B, name, model_spec(NET_A + "-b", **extra))
    result = tenants.converge(
        lambda r: all(refused(r, f"{TEAM_B}/{name}") for name in attacks),
        "every attack refused with a reason",
    )
    messages = {name: refused(result, f"{TEAM_B}/{name}") for name in attacks}
    assert "ASCEND_RUNTIME_MOUNTS" in messages["runtime-mounts"], messages
    assert "LD_PRELOAD" in messages["preload"], messages
    assert "/var/lib" in messages["outside"], messages
    assert "read-only" in messages["writable"] or ":rw" in messages["writable"], messages
    for name in attacks:
        assert tenants.services_of(TEAM_B, name) == [], name
        del tenants.index[(TEAM_B, name)]


def test_a_host_path_is_read_only_in_the_replica(
    swarm_lab: swarmlab.Lab, tenants: Tenants, models_root: Path
) -> None:
    """readOnly defaults to true: the replica reads the weights and cannot write, so it
    cannot plant a symbolic link for another deployment to mount."""
    tenants.apply(TEAM_A, "reader", model_spec(
        NET_A, volumes=[{"hostPath": str(models_root), "mountPath": "/models/tenant"}]))
    tenants.converge(lambda r: ready(r, f"{TEAM_A}/reader"), "team A's replica ready")
    replica = tenants.services_of(TEAM_A, "reader")[0]["Spec"]["Name"]
    container = service_container(swarm_lab, replica)
    read = container.exec_run(["cat", "/models/tenant/weights.bin"])
    assert (read.exit_code, read.output) == (0, b"weights")
    wrote = container.exec_run(["ln", "-s", "/", "/models/tenant/escape"])
    assert wrote.exit_code != 0 and b"Read-only file system" in wrote.output, wrote
    assert not (models_root / "escape").exists()


def test_another_namespaces_network_is_refused(swarm_lab: swarmlab.Lab, tenants: Tenants) -> None:
    """npuswarm created NET_A for team A (the first deployment naming it); team B naming it
    would put B's replicas beside A's, where they could call A's models without A's gateway."""
    if (TEAM_A, "reader") not in tenants.index:
        tenants.apply(TEAM_A, "reader", model_spec(NET_A))
    tenants.apply(TEAM_B, "intruder", model_spec(NET_A))
    result = tenants.converge(lambda r: bool(refused(r, f"{TEAM_B}/intruder")),
                              "team B refused on team A's network")
    message = refused(result, f"{TEAM_B}/intruder")
    assert f"belongs to namespace {TEAM_A}" in message, message
    assert f"NPUSWARM_SHARED_NETWORKS={NET_A}={TEAM_B}" in message, message
    assert tenants.services_of(TEAM_B, "intruder") == []
    assert ready(result, f"{TEAM_A}/reader")
    network = swarm_lab.client(1).api.networks(names=[NET_A])[0]
    assert network["Labels"].get("npuswarm.io/namespace") == TEAM_A
    del tenants.index[(TEAM_B, "intruder")]


def chat(url: str, key: str | None) -> tuple[int, dict[str, str], dict[str, Any]]:
    body = {"model": "tenant-chat", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2}
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(),
                                     headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, dict(answer.headers), json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read() or b"{}")


def test_the_lab_gateway_asks_for_a_key_limits_it_and_rotates_it_without_restart(
    swarm_lab: swarmlab.Lab, tenants: Tenants, keys: SecretKeys, gateway_image: str
) -> None:
    if (TEAM_A, "reader") not in tenants.index:
        tenants.apply(TEAM_A, "reader", model_spec(NET_A))
    keys.data = {"team": OLD_KEY.encode()}
    tenants.apply_gateway(TEAM_A, "gw", {
        "image": gateway_image, "port": PORT, "adminPort": ADMIN_PORT, "replicas": 1,
        "policy": "round_robin", "network": {"name": NET_A},
        "healthCheck": {"intervalSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 1},
        "clientAccess": {"apiKeysSecret": "team-keys", "perKey": {"requestsPerMinute": 3}},
    })
    key = f"{TEAM_A}/gw"

    def serving(result: PassResult) -> bool:
        status = result.gateways.get(key)
        return bool(status and status.readyReplicas == 1 and status.clientAccess
                    and status.clientAccess.secretVersion == keys.version
                    and any(m.backends for m in status.models))

    result = tenants.converge(serving, "team A's gateway serving with its keys", timeout=180)
    status = result.gateways[key]
    assert status.endpoint and status.clientAccess and status.clientAccess.keys == 1
    url = "http://" + status.endpoint.split(", ")[0]
    # The key is never in the status or the service spec.
    service = tenants.reconciler.swarm.services_labelled(f"npuswarm.io/gateway-namespace={TEAM_A}")
    assert OLD_KEY not in json.dumps(service) and OLD_KEY not in status.model_dump_json()

    code, _, body = chat(url, None)
    assert code == 401 and body["error"]["code"] == "invalid_api_key", body
    code, _, body = chat(url, "sk-guess")
    assert code == 401, body
    answers = [chat(url, OLD_KEY) for _ in range(4)]
    assert [a[0] for a in answers[:3]] == [200, 200, 200], answers
    code, headers, body = answers[3]
    assert code == 429 and body["error"]["code"] == "rate_limit_exceeded", body
    assert int(headers["Retry-After"]) >= 1

    before = service_container(swarm_lab, service[0]["Spec"]["Name"]).id
    # Rotation as docs/security.md says: the new key under a new name (limits belong to a
    # key's name, so renaming is what gives it a bucket of its own), then the old one goes.
    keys.data, keys.version = {"team": OLD_KEY.encode(), "team-next": NEW_KEY.encode()}, "2"
    tenants.converge(serving, "both keys in effect")
    # The pass hands the gateway its new state; the push follows on the pusher's thread.
    wait_for(lambda: chat(url, NEW_KEY)[0] == 200, "the new key accepted", timeout=20)
    keys.data, keys.version = {"team-next": NEW_KEY.encode()}, "3"
    tenants.converge(serving, "the old key removed")
    wait_for(lambda: chat(url, OLD_KEY)[0] == 401, "the old key refused", timeout=20)
    assert chat(url, NEW_KEY)[0] == 200
    assert service_container(swarm_lab, service[0]["Spec"]["Name"]).id == before
