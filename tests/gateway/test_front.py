"""The gateway front with a real vllm-router in front of fake vLLM replicas (loopback)."""

from __future__ import annotations

import http.client
import json
import time
from typing import Any

from .conftest import TOKEN, Gateway, call

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
    registered = call(f"http://127.0.0.1:{gateway.admin_port}/backends", token=TOKEN).json()
    assert [w["url"] for w in registered["workers"]] == [a1]


def test_pushing_the_same_state_twice_changes_nothing(gateway: Gateway, fake_vllm: Any) -> None:
    a = fake_vllm("a")
    assert gateway.push({"a": [a]}).status == 200
    first = call(f"http://127.0.0.1:{gateway.admin_port}/backends", token=TOKEN).json()
    assert gateway.push({"a": [a]}).status == 200
    second = call(f"http://127.0.0.1:{gateway.admin_port}/backends", token=TOKEN).json()
    assert [w["id"] for w in first["workers"]] == [w["id"] for w in second["workers"]]


def test_admin_refuses_a_wrong_token_and_a_bad_body(gateway: Gateway, fake_vllm: Any) -> None:
    a = fake_vllm("a")
    assert gateway.push({"a": [a]}, token="wrong").status == 401
    assert gateway.push({"a": ["not-a-url"]}).status == 400
    assert call(f"{gateway.url}/v1/models").status == 503  # neither push took effect


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
