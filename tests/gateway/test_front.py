"""The gateway front with a real vllm-router in front of fake vLLM replicas (loopback)."""

from __future__ import annotations

import http.client
import json
import time
from typing import Any

import pytest

from npuswarm.gateway.backends import GatewayReplica
from npuswarm.gateway.credentials import GatewayIdentity
from npuswarm.gateway.protocol import authorization
from npuswarm.gateway.push import PushTarget, Signer, admin_request

from .conftest import CREDENTIALS, IDENTITY, Gateway, call

CANNED = "This is a canned answer from the fake vLLM server."


def test_before_any_push_requests_get_a_clear_503(gateway: Gateway) -> None:
    answer = gateway.chat("a")
    assert answer.status == 503
    assert answer.json()["error"]["code"] == "gateway_not_configured"


def test_models_lists_exactly_the_models_with_backends(gateway: Gateway, fake_vllm: Any) -> None:
    a = fake_vllm("a")
    assert gateway.push({"a": [a], "b": []}).status == 200
    listed = call(f"{gateway.url}/v1/models").json()
    assert listed["object"] == "list"
    assert [m["id"] for m in listed["data"]] == ["a"]


def test_each_model_reaches_only_its_own_replicas(gateway: Gateway, fake_vllm: Any) -> None:
    a0, a1, b0 = fake_vllm("a", npus="10"), fake_vllm("a", npus="11"), fake_vllm("b", npus="20")
    assert gateway.push({"a": [a0, a1], "b": [b0]}).status == 200
    seen_a = {gateway.chat("a").npus for _ in range(6)}
    seen_b = {gateway.chat("b").npus for _ in range(6)}
    assert seen_a == {"10", "11"}  # round_robin: both replicas of a
    assert seen_b == {"20"}
    completion = call(f"{gateway.url}/v1/completions", {"model": "b", "prompt": "x"})
    assert completion.status == 200 and completion.npus == "20"
    assert completion.json()["choices"][0]["text"] == CANNED


def test_unknown_model_404_and_model_without_replica_503(gateway: Gateway, fake_vllm: Any) -> None:
    assert gateway.push({"a": [fake_vllm("a")], "b": []}).status == 200
    unknown = gateway.chat("nope")
    assert unknown.status == 404 and unknown.json()["error"]["code"] == "model_not_found"
    idle = gateway.chat("b")
    assert idle.status == 503 and idle.json()["error"]["code"] == "model_not_ready"


def test_a_removed_backend_gets_no_new_request(gateway: Gateway, fake_vllm: Any) -> None:
    a0, a1 = fake_vllm("a", npus="10"), fake_vllm("a", npus="11")
    assert gateway.push({"a": [a0, a1]}).status == 200
    assert gateway.push({"a": [a1]}).status == 200
    # The push answers once vllm-router no longer holds a0: no request may reach it after.
    assert {gateway.chat("a").npus for _ in range(6)} == {"11"}
    registered = gateway.backends()
    assert [w["url"] for w in registered["workers"]] == [a1]


def test_pushing_the_same_state_twice_changes_nothing(gateway: Gateway, fake_vllm: Any) -> None:
    a = fake_vllm("a")
    assert gateway.push({"a": [a]}).status == 200
    first = gateway.backends()
    assert gateway.push({"a": [a]}).status == 200
    second = gateway.backends()
    assert [w["id"] for w in first["workers"]] == [w["id"] for w in second["workers"]]


def test_admin_refuses_another_credential_and_a_bad_body(gateway: Gateway, fake_vllm: Any) -> None:
    a = fake_vllm("a")
    other = CREDENTIALS.credential(GatewayIdentity("tests", "other-gw", "uid-2"))
    assert gateway.push({"a": [a]}, credential=other).status == 401
    assert gateway.push({"a": ["not-a-url"]}).status == 400
    assert call(f"{gateway.url}/v1/models").status == 503  # neither push took effect


def test_admin_speaks_only_tls(gateway: Gateway) -> None:
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        connection = http.client.HTTPConnection("127.0.0.1", gateway.admin_port, timeout=5)
        connection.request("GET", "/backends")
        connection.getresponse().read()


def test_a_replayed_push_changes_nothing(gateway: Gateway, fake_vllm: Any) -> None:
    """A push recorded (as if TLS were broken) and sent again after a newer one is refused."""
    old, new = fake_vllm("a", npus="1"), fake_vllm("a", npus="2")
    credential = CREDENTIALS.credential(IDENTITY)
    recorded = json.dumps({"models": {"a": [old]}}).encode()
    header = authorization(credential, "PUT", "/backends", int(time.time() * 1000), recorded)
    replica = GatewayReplica("local", "127.0.0.1", gateway.admin_port, "")
    target = PushTarget(replica, IDENTITY.hostname, credential)

    class Fixed(Signer):
        def headers(self, credential: bytes, method: str, path: str, body: bytes) -> dict[str, str]:
            return {"Content-Type": "application/json", "Authorization": header}

    context = CREDENTIALS.client_context()
    assert admin_request(target, context, Fixed(), "PUT", "/backends", recorded)[0] == 200
    assert gateway.push({"a": [new]}).status == 200
    status, _ = admin_request(target, context, Fixed(), "PUT", "/backends", recorded)
    assert status == 401
    assert {gateway.chat("a").npus for _ in range(4)} == {"2"}


def test_a_stream_arrives_chunk_by_chunk(gateway: Gateway, fake_vllm: Any) -> None:
    a = fake_vllm("a", env={"FAKE_VLLM_TOKEN_DELAY_SECONDS": "0.25"})
    assert gateway.push({"a": [a]}).status == 200
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    body = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "max_tokens": 4}
    connection.request("POST", "/v1/chat/completions", json.dumps(body),
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type", "").startswith("text/event-stream")
    arrivals = []
    while line := response.readline():
        if line.startswith(b"data: "):
            arrivals.append((time.monotonic(), line))
    connection.close()
    assert arrivals[-1][1] == b"data: [DONE]\n"
    tokens = [t for t, line in arrivals[:-1]]
    assert len(tokens) == 4
    # Generated 250 ms apart; buffering anywhere (front or router) would deliver them together
    # at the end. Half the spread leaves room for a busy client reading two chunks at once.
    assert tokens[-1] - tokens[0] >= 3 * 0.25 * 0.5, tokens
    text = "".join(json.loads(line[6:])["choices"][0]["delta"]["content"] for _, line in arrivals[:-1])
    assert text == " ".join(CANNED.split()[:4])


ROUTER_ADMIN = [
    ("GET", "/workers", None),
    ("POST", "/workers", {"url": "http://attacker:8000", "model_id": "a"}),
    ("DELETE", "/workers/http%3A%2F%2F127.0.0.1%3A1", None),
    ("POST", "/add_worker?url=http://attacker:8000", None),
    ("POST", "/remove_worker?url=http://attacker:8000", None),
    ("GET", "/list_workers", None),
    ("POST", "/flush_cache", None),
    ("GET", "/get_loads", None),
    ("GET", "/get_server_info", None),
    ("POST", "/start_profile", None),
    ("GET", "/metrics", None),
    ("GET", "/v1/responses/resp_1", None),
    ("GET", "/v1/chat/completions", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTER_ADMIN)
def test_vllm_routers_own_api_is_not_reachable_on_the_public_port(
    gateway: Gateway, fake_vllm: Any, method: str, path: str, body: Any
) -> None:
    a = fake_vllm("a")
    assert gateway.push({"a": [a]}).status == 200
    answer = call(f"{gateway.url}{path}", body, method)
    assert answer.status == 404, answer.body
    assert answer.json()["error"]["code"] == "not_found"
    assert [w["url"] for w in gateway.backends()["workers"]] == [a]  # nothing was added or removed


@pytest.mark.parametrize(
    "route", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
              "/v1/rerank", "/rerank", "/generate"],
)
def test_every_model_route_answers_unknown_and_unready_models_itself(gateway: Gateway, route: str) -> None:
    assert gateway.push({"b": []}).status == 200
    unknown = call(f"{gateway.url}{route}", {"model": "nope", "input": "x"})
    assert unknown.status == 404 and unknown.json()["error"]["code"] == "model_not_found"
    idle = call(f"{gateway.url}{route}", {"model": "b", "input": "x"})
    assert idle.status == 503 and idle.json()["error"]["code"] == "model_not_ready"
    nameless = call(f"{gateway.url}{route}", {"input": "x"})
    assert nameless.status == 400 and nameless.json()["error"]["code"] == "model_required"


def test_retrieve_a_model_as_openai_does(gateway: Gateway, fake_vllm: Any) -> None:
    assert gateway.push({"org/a": [fake_vllm("a")], "b": []}).status == 200
    assert call(f"{gateway.url}/v1/models/org/a").json()["id"] == "org/a"
    assert call(f"{gateway.url}/v1/models/b").status == 404  # no ready replica: not listed
