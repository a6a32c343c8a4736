"""Scale from zero at the gateway front (a real vllm-router, fake vLLMs on loopback): a request
for a model that scales from zero and has no ready backend is held, reported on GET /load,
and forwarded as soon as a backend is pushed; past the wait or the queue it gets OpenAI's 503
model_not_ready with Retry-After. A push without ``scaleFromZero`` (an operator from before)
holds nothing."""

from __future__ import annotations

import threading
import time
from typing import Any

from tests.helpers import wait_for

from .conftest import Answer, Gateway, call


def hold(models: list[str], wait: int = 60, queued: int = 10, retry_after: int = 7) -> dict[str, Any]:
    return {"models": models, "maxWaitSeconds": wait, "maxQueuedRequests": queued,
            "retryAfterSeconds": retry_after}


def demand(gateway: Gateway, model: str) -> dict[str, Any]:
    return gateway.admin("GET", "/load").json()["demand"][model]  # type: ignore[no-any-return]


class Asking:
    """One chat request in a thread: (answer, when it came back)."""

    def __init__(self, gateway: Gateway, model: str) -> None:
        self.answer: Answer | None = None
        self.ended = 0.0
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._run, args=(gateway, model))
        self.thread.start()

    def _run(self, gateway: Gateway, model: str) -> None:
        self.answer = gateway.chat(model, max_tokens=3)
        self.ended = time.monotonic()

    def result(self) -> Answer:
        self.thread.join(timeout=90)
        assert self.answer is not None
        return self.answer


def test_a_held_request_is_answered_once_a_replica_is_pushed(gateway: Gateway, fake_vllm: Any) -> None:
    assert gateway.push({"a": []}, scale_from_zero=hold(["a"])).status == 200
    # Listed: a client that reads /v1/models first still finds the model it can wake.
    assert [m["id"] for m in call(f"{gateway.url}/v1/models").json()["data"]] == ["a"]
    asking = Asking(gateway, "a")
    wait_for(lambda: demand(gateway, "a")["held"] == 1, "the request held and reported",
             timeout=20, interval=0.1)
    assert asking.answer is None
    replica = fake_vllm("a")
    pushed = time.monotonic()
    assert gateway.push({"a": [replica]}, scale_from_zero=hold(["a"])).status == 200
    answer = asking.result()
    assert answer.status == 200, answer.body
    assert asking.ended >= pushed
    assert demand(gateway, "a")["held"] == 0


def test_no_replica_within_the_wait_is_503_model_not_ready_with_retry_after(gateway: Gateway) -> None:
    assert gateway.push({"a": []}, scale_from_zero=hold(["a"], wait=2, retry_after=7)).status == 200
    started = time.monotonic()
    answer = gateway.chat("a")
    waited = time.monotonic() - started
    assert answer.status == 503 and answer.json()["error"]["code"] == "model_not_ready"
    assert answer.headers["retry-after"] == "7"
    assert "within 2 s" in answer.json()["error"]["message"]
    # Held for the configured wait, not refused at once, and not kept past it (30 s: the
    # client's own timeout in `call`).
    assert 2 <= waited < 30, waited


def test_a_full_queue_is_refused_at_once_with_retry_after(gateway: Gateway) -> None:
    assert gateway.push({"a": []}, scale_from_zero=hold(["a"], wait=20, queued=1)).status == 200
    first = Asking(gateway, "a")
    wait_for(lambda: demand(gateway, "a")["held"] == 1, "one request held", timeout=20, interval=0.1)
    second = gateway.chat("a")
    assert second.status == 503 and second.headers["retry-after"] == "7"
    assert "already wait" in second.json()["error"]["message"]
    assert first.answer is None  # still held
    assert gateway.push({"a": []}, scale_from_zero=hold([])).status == 200
    # No longer scaling from zero: the held request is answered as any unready model is.
    assert first.result().status == 503


def test_without_scale_from_zero_a_model_without_replica_is_503_at_once(gateway: Gateway) -> None:
    """An operator from before pushes no scaleFromZero; a model not marked is not held."""
    for marked in (None, hold(["other"])):
        assert gateway.push({"a": [], "other": []}, scale_from_zero=marked).status == 200
        started = time.monotonic()
        answer = gateway.chat("a")
        assert answer.status == 503 and "retry-after" not in answer.headers
        assert time.monotonic() - started < 2  # not held (it would be 60 s)


def test_idle_seconds_count_from_the_last_request(gateway: Gateway, fake_vllm: Any) -> None:
    replica = fake_vllm("a")
    assert gateway.push({"a": [replica]}, scale_from_zero=hold(["a"])).status == 200
    wait_for(lambda: demand(gateway, "a")["idleSeconds"] >= 1.5, "idle time growing", timeout=20,
             interval=0.2)
    assert gateway.chat("a").status == 200
    assert demand(gateway, "a")["idleSeconds"] < 1.5


def test_a_malformed_scale_from_zero_is_refused(gateway: Gateway) -> None:
    assert gateway.push({"a": []}, scale_from_zero={"models": "a"}).status == 400
    assert gateway.push({"a": []}, scale_from_zero={**hold(["a"]), "maxWaitSeconds": 0}).status == 400
