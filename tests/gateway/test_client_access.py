"""Client access at the gateway front, with a real vllm-router and fake vLLM replicas: API keys
(OpenAI's 401), models per key, rotation without restart, rate limits (429 + Retry-After), and
bounds that keep one client from taking the gateway down (docs/security.md, "Client access")."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.helpers import wait_for

from .conftest import Gateway, call

OLD, NEW, CI = "sk-old-0123456789", "sk-new-0123456789", "sk-ci-0123456789"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def keys(*entries: tuple[str, str], anonymous: bool = False, **limits: Any) -> dict[str, Any]:
    """The access state the operator pushes (gateway/access.py)."""
    return {
        "anonymous": {"allowed": anonymous, "rpm": limits.get("anonymous_rpm", 0), "tpm": 0},
        "keys": {
            digest(key): {"name": name, "models": limits.get(f"{name}_models"),
                          "rpm": limits.get("rpm", 0), "tpm": limits.get("tpm", 0)}
            for name, key in entries
        },
    }


def chat(gateway: Gateway, model: str, key: str | None, **extra: Any) -> Any:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    return call(f"{gateway.url}/v1/chat/completions", body, key=key)


def test_requests_need_a_valid_key_in_openais_shape(gateway: Gateway, fake_vllm: Any) -> None:
    assert gateway.push({"a": [fake_vllm("a")]}, access=keys(("team", OLD))).status == 200
    for key, message in ((None, "no API key"), ("sk-wrong", "not valid")):
        refused = chat(gateway, "a", key)
        assert refused.status == 401, refused.body
        error = refused.json()["error"]
        assert error["code"] == "invalid_api_key" and message in error["message"]
        assert "sk-" not in refused.body.decode()  # the key is not echoed
    assert call(f"{gateway.url}/v1/models").status == 401
    assert chat(gateway, "a", OLD).status == 200
    assert [m["id"] for m in call(f"{gateway.url}/v1/models", key=OLD).json()["data"]] == ["a"]


def test_a_key_reaches_only_its_models(gateway: Gateway, fake_vllm: Any) -> None:
    state = keys(("team", OLD), ("ci", CI), ci_models=["a"])
    assert gateway.push({"a": [fake_vllm("a")], "b": [fake_vllm("b")]}, access=state).status == 200
    assert chat(gateway, "a", CI).status == 200
    other = chat(gateway, "b", CI)
    assert other.status == 404 and other.json()["error"]["code"] == "model_not_found"
    assert [m["id"] for m in call(f"{gateway.url}/v1/models", key=CI).json()["data"]] == ["a"]
    assert chat(gateway, "b", OLD).status == 200


def test_a_rotated_key_works_at_once_and_no_request_with_it_fails(
    gateway: Gateway, fake_vllm: Any
) -> None:
    a = fake_vllm("a")
    assert gateway.push({"a": [a]}, access=keys(("k", OLD))).status == 200
    pid = gateway.proc.pid
    failed: list[int] = []
    sent = [0]
    stop = threading.Event()
    use = [OLD]

    def client() -> None:
        while not stop.is_set():
            status = chat(gateway, "a", use[0]).status
            sent[0] += 1
            if status != 200:
                failed.append(status)

    worker = threading.Thread(target=client)
    worker.start()
    try:
        wait_for(lambda: sent[0] >= 10, "requests with the old key")
        assert gateway.push({"a": [a]}, access=keys(("k", OLD), ("k2", NEW))).status == 200
        use[0] = NEW  # clients move once the gateway holds the new key
        wait_for(lambda: sent[0] >= 30, "requests with the new key")
        assert gateway.push({"a": [a]}, access=keys(("k2", NEW))).status == 200
        before = sent[0]
        wait_for(lambda: sent[0] >= before + 10, "requests after the old key is gone")
    finally:
        stop.set()
        worker.join(30)
    assert failed == []
    assert chat(gateway, "a", OLD).status == 401
    assert gateway.proc.pid == pid and gateway.proc.poll() is None  # no restart


def test_over_the_request_rate_a_key_gets_429_with_retry_after(
    gateway: Gateway, fake_vllm: Any
) -> None:
    assert gateway.push({"a": [fake_vllm("a")]}, access=keys(("k", OLD), rpm=2)).status == 200
    assert [chat(gateway, "a", OLD).status for _ in range(2)] == [200, 200]
    limited = chat(gateway, "a", OLD)
    assert limited.status == 429
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(limited.headers["retry-after"]) <= 30


def test_over_the_token_rate_a_key_waits_for_its_debt(gateway: Gateway, fake_vllm: Any) -> None:
    assert gateway.push({"a": [fake_vllm("a")]}, access=keys(("k", OLD), tpm=6)).status == 200
    first = chat(gateway, "a", OLD, max_tokens=8)
    assert first.status == 200 and first.json()["usage"]["total_tokens"] > 6
    limited = chat(gateway, "a", OLD)
    assert limited.status == 429 and int(limited.headers["retry-after"]) >= 1


def test_anonymous_clients_share_their_own_limit(gateway: Gateway, fake_vllm: Any) -> None:
    state = keys(("k", OLD), anonymous=True, anonymous_rpm=1)
    assert gateway.push({"a": [fake_vllm("a")]}, access=state).status == 200
    assert chat(gateway, "a", None).status == 200
    assert chat(gateway, "a", None).status == 429
    assert chat(gateway, "a", OLD).status == 200  # a key has its own bucket


def test_bodies_are_bounded_in_size_and_time(make_gateway: Any, fake_vllm: Any) -> None:
    gateway = make_gateway("--max-body-bytes", "2048", "--body-timeout", "1")
    assert gateway.push({"a": [fake_vllm("a")]}).status == 200
    huge = chat(gateway, "a", None, padding="x" * 4096)
    assert huge.status == 413 and huge.json()["error"]["code"] == "request_too_large"
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as slow:
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"mo")
        answer = slow.recv(4096)  # the gateway gives up on the body after 1 s
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert chat(gateway, "a", None).status == 200  # and serves others meanwhile


def test_requests_in_flight_are_bounded(make_gateway: Any, fake_vllm: Any) -> None:
    gateway = make_gateway("--max-in-flight", "1")
    slow = fake_vllm("a", env={"FAKE_VLLM_LATENCY_SECONDS": "3"})
    assert gateway.push({"a": [slow]}).status == 200
    first: list[Any] = []
    holder = threading.Thread(target=lambda: first.append(chat(gateway, "a", None)))
    holder.start()
    try:
        def running() -> bool:
            metrics = urllib.request.urlopen(f"{slow}/metrics", timeout=5).read().decode()
            return any(line.startswith("vllm:num_requests_running") and not line.endswith(" 0")
                       and not line.endswith(" 0.0") for line in metrics.splitlines())

        wait_for(running, "the first request running at the replica", 10, 0.05)
        busy = chat(gateway, "a", None)
        assert busy.status == 503 and busy.json()["error"]["code"] == "gateway_overloaded"
        assert busy.headers["retry-after"] == "1"
    finally:
        holder.join(30)
    assert first and first[0].status == 200


class Echo(BaseHTTPRequestHandler):
    """A replica that answers what headers reached it."""

    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:  # vllm-router's health checks
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        Echo.seen.append({k.lower(): v for k, v in self.headers.items()})
        body = json.dumps({"choices": [], "usage": {"total_tokens": 1}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def echo() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_clients_key_never_reaches_a_replica(gateway: Gateway, echo: str) -> None:
    Echo.seen.clear()
    assert gateway.push({"a": [echo]}, access=keys(("k", OLD))).status == 200
    assert chat(gateway, "a", OLD).status == 200
    assert Echo.seen and all("authorization" not in h for h in Echo.seen)
    assert all(OLD not in json.dumps(h) for h in Echo.seen)
