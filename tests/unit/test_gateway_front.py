"""The gateway front's pure parts: what it answers itself, and how it reconciles vllm-router."""

from __future__ import annotations

import json

import pytest

from npuswarm.gateway_front import (
    authorised,
    models_body,
    parse_state,
    refusal,
    worker_diff,
)


def body(response: object) -> dict[str, object]:
    return json.loads(response.body)  # type: ignore[attr-defined,no-any-return]


def test_models_lists_only_models_with_a_backend_in_openai_shape() -> None:
    listed = models_body({"b": ("http://x:1",), "a": ("http://y:1",), "idle": ()}, created=7)
    assert listed == {
        "object": "list",
        "data": [
            {"id": "a", "object": "model", "created": 7, "owned_by": "npuswarm"},
            {"id": "b", "object": "model", "created": 7, "owned_by": "npuswarm"},
        ],
    }


def test_unknown_model_is_openai_404() -> None:
    answer = refusal("nope", {"m": ("http://x:1",)})
    assert answer is not None and answer.status == 404
    assert body(answer)["error"] == {
        "message": "The model `nope` does not exist.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }


def test_model_without_ready_replica_is_503_with_a_reason() -> None:
    answer = refusal("m", {"m": ()})
    assert answer is not None and answer.status == 503
    assert body(answer)["error"]["code"] == "model_not_ready"  # type: ignore[index]


def test_known_model_with_a_backend_is_forwarded() -> None:
    assert refusal("m", {"m": ("http://x:1",)}) is None


def test_before_the_first_push_nothing_is_forwarded() -> None:
    answer = refusal("m", None)
    assert answer is not None and answer.status == 503
    assert body(answer)["error"]["code"] == "gateway_not_configured"  # type: ignore[index]


@pytest.mark.parametrize("model", [None, "", 3])
def test_a_request_without_a_model_name_is_400(model: object) -> None:
    answer = refusal(model, {"m": ("http://x:1",)})
    assert answer is not None and answer.status == 400


def test_state_is_parsed_sorted_and_deduplicated() -> None:
    state = parse_state({"models": {"m": ["http://b:1", "http://a:1", "http://a:1"], "n": []}})
    assert state == {"m": ("http://a:1", "http://b:1"), "n": ()}


@pytest.mark.parametrize(
    "bad",
    [
        [],
        {"models": []},
        {"models": {"m": "http://a:1"}},
        {"models": {"m": ["ftp://a"]}},
        {"models": {"": []}},
        {"models": {"m": ["http://a:1"], "n": ["http://a:1"]}},
    ],
)
def test_malformed_state_is_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_state(bad)


def test_worker_diff_adds_the_missing_and_removes_the_unwanted() -> None:
    registered = [
        {"url": "http://keep:1", "model_id": "m"},
        {"url": "http://gone:1", "model_id": "m"},
        {"url": "http://moved:1", "model_id": "old"},
    ]
    diff = worker_diff({"m": ("http://keep:1", "http://new:1"), "n": ("http://moved:1",)}, registered)
    assert diff.remove == ["http://gone:1", "http://moved:1"]
    assert diff.add == [("http://moved:1", "n"), ("http://new:1", "m")]


def test_worker_diff_of_the_same_state_is_empty() -> None:
    registered = [{"url": "http://a:1", "model_id": "m"}]
    diff = worker_diff({"m": ("http://a:1",)}, registered)
    assert diff.add == [] and diff.remove == []


def test_admin_needs_the_exact_bearer_token() -> None:
    assert authorised("Bearer s3cret", "s3cret")
    assert not authorised("Bearer s3cre", "s3cret")
    assert not authorised("s3cret", "s3cret")
    assert not authorised(None, "s3cret")
    assert not authorised("Bearer ", "")  # no token configured: nothing is authorised
