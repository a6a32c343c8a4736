"""A ModelGateway on the multi-node lab: the gateway image (vllm-router + its front) as a Swarm
service, two models behind it, backends following placement. The Reconciler runs passes here
exactly as the operator runs them (with its gateway pushes); clients call the gateway's
host-mode published port at a node's address, as they would on a cluster without IPVS."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import swarmlab
from npuswarm.api.deployment import ModelDeployment
from npuswarm.api.gateway import ModelGateway
from npuswarm.core.pipeline import Desired
from npuswarm.gateway import protocol
from npuswarm.gateway.backends import GatewayReplica
from npuswarm.gateway.credentials import Credentials
from npuswarm.gateway.push import Gateways, PushTarget, Signer, admin_request
from npuswarm.gateway.service import identity
from npuswarm.reconcile import PassResult, Reconciler
from npuswarm.swarm import Swarm
from tests.helpers import wait_for

from .conftest import lab_settings, service_container, tear_down
from .test_npuswarm_on_lab import lab_model

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
NETWORK = "npuswarm-gw-net"
ROOT_KEY = "lab-gateway-root-key-0123456789"
PORT, ADMIN_PORT = 18100, 18101
# vllm-router's own health checks of the backends: every second, out after one failure.
HEALTH = {"intervalSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 1}
# A killed replica is out of the router within interval + timeout; a little slack for load.
HEALTH_WINDOW_SECONDS = 4.0
TOKEN_DELAY = "0.05"


@pytest.fixture(scope="module")
def network(swarm_lab: swarmlab.Lab) -> Iterator[str]:
    api = swarm_lab.client(1).api
    if not api.networks(names=[NETWORK]):
        api.create_network(NETWORK, driver="overlay", attachable=True)
    yield NETWORK


def model(name: str, created: str, generation: int = 1, **spec: Any) -> ModelDeployment:
    """A fake vLLM model; another ``generation`` is a spec change (a rolling update)."""
    env = {"FAKE_VLLM_TOKEN_DELAY_SECONDS": TOKEN_DELAY, "FAKE_GENERATION": str(generation)}
    return lab_model(
        name,
        created,
        NETWORK,
        servedModelName=f"{name}-chat",
        engine={"port": 8000, "env": env},
        updateStrategy={"maxUnavailable": 1},
        **spec,
    )


def gateway(
    image: str, namespace: str = "lab", port: int = PORT, admin_port: int = ADMIN_PORT,
    replicas: int = 2,
) -> ModelGateway:
    return ModelGateway.model_validate(
        {
            "metadata": {"name": "gw", "namespace": namespace, "generation": 1,
                         "uid": f"uid-{namespace}-gw"},
            "spec": {
                "image": image,
                "port": port,
                "adminPort": admin_port,
                "replicas": replicas,
                "policy": "round_robin",
                "network": {"name": NETWORK},
                "healthCheck": HEALTH,
            },
        }
    )


@dataclass
class Setup:
    reconciler: Reconciler
    deployments: list[ModelDeployment]
    gateway: ModelGateway
    last: PassResult | None = None
    others: list[ModelGateway] = field(default_factory=list)  # other tenants' gateways

    def desired(self) -> Desired:
        return Desired(deployments=self.deployments, gateways=[self.gateway, *self.others])

    def converge(self, check: Callable[[PassResult], bool], what: str, timeout: float = 120) -> PassResult:
        """Passes as the operator runs them (its busy task poll is 1 s) until ``check``."""

        def done() -> PassResult | None:
            self.last = self.reconciler.run_pass(self.desired())
            return self.last if check(self.last) else None

        return wait_for(done, what, timeout=timeout, interval=0.5)

    @property
    def url(self) -> str:
        assert self.last is not None
        status = self.last.gateways["lab/gw"]
        assert status.endpoint
        return "http://" + status.endpoint.split(", ")[0]

    def backends(self, model_name: str) -> list[str]:
        assert self.last is not None
        status = self.last.gateways["lab/gw"]
        return next((m.backends for m in status.models if m.model == model_name), [])


def all_ready(result: PassResult, alpha_backends: int = 2) -> bool:
    status = result.gateways["lab/gw"]
    backends = {m.model: len(m.backends) for m in status.models}
    return (
        status.readyReplicas == 2
        and backends == {"alpha-chat": alpha_backends, "beta-chat": 1, "gamma-chat": 0}
        and all(v.status.phase == "Ready" for k, v in result.views.items() if k != "lab/gamma")
    )


@pytest.fixture(scope="module")
def setup(swarm_lab: swarmlab.Lab, gateway_image: str, network: str) -> Iterator[Setup]:
    settings = lab_settings(gateway_root_key=ROOT_KEY, lost_node_grace_seconds=3)
    reconciler = Reconciler(
        Swarm(base_url=swarm_lab.endpoint),
        settings,
        gateways=Gateways(
            settings.instance,
            Credentials(ROOT_KEY, settings.instance),
            policy=settings.tenant_policy(),
        ),
    )
    alpha = model("alpha", "2026-01-10T00:00:00Z", replicas=2)
    beta = model("beta", "2026-01-11T00:00:00Z", replicas=1)
    # Never placed (no node has the label): declared, selected, and with no ready replica.
    gamma = model("gamma", "2026-01-12T00:00:00Z", replicas=1, nodeSelector={"nowhere": "x"})
    made = Setup(reconciler, [alpha, beta, gamma], gateway(gateway_image))
    try:
        made.converge(all_ready, "the gateway and both models to be ready", timeout=180)
        yield made
    finally:
        tear_down(reconciler, made.deployments)


# --- the client side ----------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[str, str]
    started: float = 0.0

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def replica(self) -> dict[str, Any]:
        """The fake vLLM that answered: its container hostname and NPUs."""
        return json.loads(self.headers["x-fake-vllm-npus"])  # type: ignore[no-any-return]


def post(url: str, body: dict[str, Any], timeout: float = 30) -> Reply:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            headers = {k.lower(): v for k, v in answer.headers.items()}
            return Reply(answer.status, answer.read(), headers, started)
    except urllib.error.HTTPError as error:
        headers = {k.lower(): v for k, v in error.headers.items()}
        return Reply(error.code, error.read(), headers, started)
    except OSError as error:
        return Reply(0, str(error).encode(), {}, started)


def chat(url: str, model_name: str, **extra: Any) -> Reply:
    body = {"model": model_name, "messages": [{"role": "user", "content": "hi"}], **extra}
    return post(f"{url}/v1/chat/completions", body)


def listed_models(url: str) -> set[str]:
    try:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as answer:
            return {m["id"] for m in json.loads(answer.read())["data"]}
    except OSError:
        return set()


@dataclass
class Load:
    """Constant load: ``workers`` clients each sending one chat request after another, from
    the moment the gateway lists the model: a pass's result names the backends it handed the
    gateway, which the pusher delivers on its own thread a moment later."""

    url: str
    model_name: str
    workers: int = 4
    replies: list[Reply] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Load:
        wait_for(lambda: self.model_name in listed_models(self.url),
                 f"the gateway to list {self.model_name}", timeout=60, interval=0.2)
        self.threads = [threading.Thread(target=self._run) for _ in range(self.workers)]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.replies.append(chat(self.url, self.model_name, max_tokens=3))

    def failed(self, since: float = 0.0) -> list[Reply]:
        return [r for r in self.replies if r.status != 200 and r.started >= since]


# --- the tests ----------------------------------------------------------------------------


def test_models_lists_exactly_the_ready_models(setup: Setup) -> None:
    with urllib.request.urlopen(f"{setup.url}/v1/models", timeout=10) as answer:
        listed = json.loads(answer.read())
    assert listed["object"] == "list"
    assert sorted(m["id"] for m in listed["data"]) == ["alpha-chat", "beta-chat"]
    unknown = chat(setup.url, "nope")
    assert unknown.status == 404 and unknown.json()["error"]["code"] == "model_not_found"
    idle = chat(setup.url, "gamma-chat")  # declared, no ready replica: no hang, a clear 503
    assert idle.status == 503 and idle.json()["error"]["code"] == "model_not_ready"


def test_two_models_at_once_reach_their_own_replicas(setup: Setup) -> None:
    assert setup.last is not None
    npus = {
        key.split("/")[1]: {",".join(map(str, r.npus)) for r in view.status.replicaStatuses}
        for key, view in setup.last.views.items()
    }
    replies: dict[str, list[Reply]] = {"alpha-chat": [], "beta-chat": []}

    def ask(name: str, kind: str) -> None:
        if kind == "chat":
            replies[name].append(chat(setup.url, name))
        else:
            replies[name].append(post(f"{setup.url}/v1/completions", {"model": name, "prompt": "x"}))

    threads = [
        threading.Thread(target=ask, args=(name, kind))
        for _ in range(4)
        for name in replies
        for kind in ("chat", "completion")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for name, got in replies.items():
        assert [r.status for r in got] == [200] * 8, [r.body[:200] for r in got]
        assert all(r.json()["model"] == name for r in got)
        deployment = name.removesuffix("-chat")
        assert {r.replica["ASCEND_VISIBLE_DEVICES"] for r in got} <= npus[deployment]
    # round_robin over alpha's two replicas: both answered.
    assert len({r.replica["hostname"] for r in replies["alpha-chat"]}) == 2


def test_a_stream_arrives_chunk_by_chunk(setup: Setup) -> None:
    host, port = setup.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {"model": "beta-chat", "messages": [{"role": "user", "content": "hi"}],
            "stream": True, "max_tokens": 8}
    connection.request("POST", "/v1/chat/completions", json.dumps(body),
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    arrivals = []
    while line := response.readline():
        if line.startswith(b"data: "):
            arrivals.append(time.monotonic())
    connection.close()
    assert len(arrivals) == 9  # 8 tokens and [DONE]
    # Generated 50 ms apart (350 ms from first to last); buffered anywhere, they would all
    # arrive together at the end. Half the spread leaves room for a busy client that reads two
    # chunks at once now and then.
    assert arrivals[7] - arrivals[0] >= 7 * float(TOKEN_DELAY) * 0.5, arrivals


def test_a_killed_replica_gets_no_new_request_after_the_health_check_time(
    swarm_lab: swarmlab.Lab, setup: Setup
) -> None:
    assert setup.last is not None
    victim = setup.last.views["lab/alpha"].status.replicaStatuses[0]
    index = next(i for i in range(1, 4) if swarm_lab.node(i).hostname == victim.hostname)
    client = swarm_lab.client(index)
    (container,) = client.containers.list(
        filters={"label": f"com.docker.swarm.service.name={victim.service}"}
    )
    killed_hostname = container.attrs["Config"]["Hostname"]
    with Load(setup.url, "alpha-chat") as load:
        wait_for(lambda: len(load.replies) >= 20, "the load to be under way")
        container.kill()
        killed = time.monotonic()
        wait_for(
            lambda: sum(r.started > killed + HEALTH_WINDOW_SECONDS for r in load.replies) >= 40,
            "requests after the health-check window",
        )
    late = [r for r in load.replies if r.started > killed + HEALTH_WINDOW_SECONDS]
    assert load.failed(since=killed + HEALTH_WINDOW_SECONDS) == [], [
        r.body[:200] for r in load.failed(killed + HEALTH_WINDOW_SECONDS)
    ]
    assert all(r.replica["hostname"] != killed_hostname for r in late)
    print(
        f"\nkilled {killed_hostname}: {len(load.replies)} requests, "
        f"{len(load.failed())} failed (all within {HEALTH_WINDOW_SECONDS}s of the kill)"
    )
    # Swarm restarts the replica's task; the next passes put it back behind the gateway.
    setup.converge(all_ready, "the restarted replica back behind the gateway")


def test_a_rolling_update_under_constant_load_fails_no_request(setup: Setup) -> None:
    alpha = setup.deployments[0]
    updated = model("alpha", alpha.metadata.creationTimestamp or "", generation=2, replicas=2)
    writes: list[int] = []

    def rolled(result: PassResult) -> bool:
        """Both replicas were updated (a write each) and a pass then found nothing to do."""
        writes.append(len(result.views["lab/alpha"].applied))
        return sum(writes) >= 2 and writes[-1] == 0 and all_ready(result)

    with Load(setup.url, "alpha-chat") as load:
        wait_for(lambda: len(load.replies) >= 20, "the load to be under way")
        setup.deployments[0] = updated
        setup.converge(rolled, "alpha rolled to its new spec behind the gateway", timeout=180)
        settled = len(load.replies)
        wait_for(lambda: len(load.replies) >= settled + 20, "requests to the new replicas")
    assert load.failed() == [], [r.body[:200] for r in load.failed()]
    print(f"\nrolling update under load: {len(load.replies)} requests, 0 failed")


# --- attacks that must fail (docs/security.md) ----------------------------------------------


ROUTER_ADMIN = [("GET", "/workers"), ("POST", "/workers"), ("GET", "/list_workers"),
                ("POST", "/add_worker?url=http://10.123.0.250:8000"), ("POST", "/flush_cache"),
                ("POST", "/remove_worker?url=http://10.0.0.1:8000")]


def request(url: str, method: str, body: Any = None) -> Reply:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as answer:
            return Reply(answer.status, answer.read(), {})
    except urllib.error.HTTPError as error:
        return Reply(error.code, error.read(), {})


def test_the_router_admin_api_is_closed_on_the_public_port(setup: Setup) -> None:
    """As any client on the network would try it: list, add and remove workers."""
    assert setup.last is not None
    before = sorted(setup.backends("alpha-chat"))
    for method, path in ROUTER_ADMIN:
        body = {"url": "http://10.123.0.250:8000", "model_id": "alpha-chat"} if method == "POST" else None
        answer = request(f"{setup.url}{path}", method, body)
        assert answer.status == 404, (method, path, answer.body[:200])
        assert answer.json()["error"]["code"] == "not_found"
    # Still exactly the replicas npuswarm pushed, and every request is answered by them.
    replies = [chat(setup.url, "alpha-chat") for _ in range(6)]
    assert [r.status for r in replies] == [200] * 6
    assert sorted(setup.backends("alpha-chat")) == before


def test_one_gateways_credential_opens_no_other_gateway(
    swarm_lab: swarmlab.Lab, setup: Setup
) -> None:
    """Tenant B chose its gateway's image, so it can read B's credential in B's container;
    with it, it pushes its own backends to A's admin port. A changes nothing. Neither the
    service spec nor the container shows A's credential."""
    other = gateway(setup.gateway.spec.image, namespace="lab-b", port=PORT + 10,
                    admin_port=ADMIN_PORT + 10, replicas=1)
    setup.others = [other]
    try:
        setup.converge(
            lambda r: all_ready(r) and r.gateways["lab-b/gw"].readyReplicas == 1,
            "tenant B's gateway too",
        )
        b_container = service_container(swarm_lab, "lab-b-gw-gateway")
        path = "/run/secrets/npuswarm-gateway-credential"
        read = b_container.exec_run(["cat", path])
        assert read.exit_code == 0
        b_credential = protocol.parse_credential(read.output.decode())
        # A's secret is not mounted in B's container at all.
        assert b_container.exec_run(["ls", "/run/secrets"]).output.decode().split() == [
            "npuswarm-gateway-credential", "npuswarm-gateway-tls.pem"]

        status = setup.last.gateways["lab/gw"] if setup.last else None
        assert status is not None
        a_node = status.endpoint.split(", ")[0].split(":")[0] if status.endpoint else ""
        credentials = setup.reconciler.gateways.credentials if setup.reconciler.gateways else None
        assert credentials is not None
        a_identity = identity(setup.gateway)
        target = PushTarget(GatewayReplica("a", a_node, ADMIN_PORT, ""), a_identity.hostname,
                            b_credential)
        evil = {"models": {"alpha-chat": ["http://10.123.0.250:8000"]}}
        code, text = admin_request(target, credentials.client_context(), Signer(), "PUT",
                                   "/backends", json.dumps(evil).encode())
        assert code == 401, text
        # B's TLS certificate cannot stand in for A's name either.
        assert other.key != setup.gateway.key
        replies = [chat(setup.url, "alpha-chat") for _ in range(6)]
        assert [r.status for r in replies] == [200] * 6

        a_credential = credentials.credential(a_identity)
        a_container = service_container(swarm_lab, "lab-gw-gateway")
        service = setup.reconciler.swarm.services_labelled("npuswarm.io/gateway-namespace=lab")
        for shown in (json.dumps(service), json.dumps(a_container.attrs)):
            assert a_credential.hex() not in shown and ROOT_KEY not in shown
            assert "NPUSWARM_GATEWAY" not in shown
    finally:
        setup.others = []
        setup.reconciler.finalize_gateway("lab-b", "gw")
