"""The front's GET /load: its backends' engine load, read from their /metrics (the fake vLLM's
gauges have vLLM's names), served signed on the admin port for npuswarm's autoscaler."""

from __future__ import annotations

import threading
from typing import Any

from npuswarm.gateway import load
from tests.helpers import wait_for

from .conftest import CREDENTIALS, Gateway, GatewayIdentity, call


def test_load_reports_each_backends_waiting_and_running_requests(gateway: Gateway, fake_vllm: Any) -> None:
    # One request runs at a time on `a`; the others queue: vLLM's running and waiting gauges.
    held = {"FAKE_VLLM_HOLD": "1", "FAKE_VLLM_MAX_RUNNING": "1"}
    a, b = fake_vllm("a", env=held), fake_vllm("b")
    assert gateway.push({"a": [a], "b": [b]}).status == 200
    answers: list[int] = []
    senders = [threading.Thread(target=lambda: answers.append(gateway.chat("a").status)) for _ in range(3)]
    for sender in senders:
        sender.start()

    def loaded() -> dict[str, Any] | None:
        body = gateway.admin("GET", "/load").json()
        reading = body["models"].get("a", {}).get(a)
        return body if reading and reading["running"] == 1 and reading["waiting"] == 2 else None

    body = wait_for(loaded, "the held requests in a's gauges", timeout=30, interval=0.2)
    assert body["models"]["b"][b] == {"waiting": 0, "running": 0, "kvCache": 0}
    assert 0 < body["models"]["a"][a]["kvCache"] <= 1
    assert body["errors"] == {} and body["ageSeconds"] >= 0
    # Three requests in flight at the front: a is not idle, and none is held (it has a backend).
    assert body["demand"]["a"] == {"held": 0, "idleSeconds": 0}
    assert load.merge([body])["a"] == load.ModelLoad(replicas=1, waiting=2, running=1,
                                                      kv_cache=body["models"]["a"][a]["kvCache"],
                                                      held=0, idle_seconds=0)

    assert call(f"{a}/fake/release", {}).status == 200
    for sender in senders:
        sender.join(timeout=30)
    assert answers == [200, 200, 200]
    wait_for(lambda: gateway.admin("GET", "/load").json()["models"]["a"][a]["waiting"] == 0,
             "a's queue drained in /load", timeout=30, interval=0.2)


def test_a_backend_without_metrics_is_named_not_counted(gateway: Gateway, fake_vllm: Any) -> None:
    a = fake_vllm("a")
    # Nothing listens there: the scrape fails within its timeout, the rest are still read.
    dead = "http://127.0.0.1:9"
    assert gateway.push({"a": [a, dead]}).status == 200
    body = wait_for(
        lambda: (lambda b: b if dead in b["errors"] and a in b["models"].get("a", {}) else None)(
            gateway.admin("GET", "/load").json()),
        "the dead backend named in /load", timeout=30, interval=0.2,
    )
    assert list(body["models"]["a"]) == [a]
    assert load.merge([body])["a"].replicas == 1


def test_load_is_refused_without_the_gateways_credential(gateway: Gateway) -> None:
    other = CREDENTIALS.credential(GatewayIdentity("tests", "another", "uid-2"))
    refused = gateway.admin("GET", "/load", credential=other)
    assert refused.status == 401
    assert "models" not in refused.json()
    # The public port does not serve it at all.
    assert call(f"{gateway.url}/load").status == 404
