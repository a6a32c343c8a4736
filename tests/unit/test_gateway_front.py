"""The gateway front's pure parts: what it answers itself, and how it reconciles vllm-router."""

from __future__ import annotations

import json

import pytest

from npuswarm.gateway import front
from npuswarm.gateway.front import (
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


def test_a_model_that_keeps_backends_never_has_zero_workers_in_the_router_during_a_push() -> None:
    """vllm-router sends a request for a model without workers to another model's worker (a
    404 from the wrong model was seen in the lab's rolling update): while `alpha` moves from
    one replica to another, the router must always hold a worker for it, and the front must
    not answer by the new state before the router has it."""
    import asyncio
    from urllib.parse import unquote

    from aiohttp import web

    from npuswarm.gateway.front import Front

    async def scenario() -> list[tuple[str, dict[str, int], bool]]:
        workers: dict[str, str] = {"http://old:1": "alpha", "http://beta:1": "beta"}
        seen: list[tuple[str, dict[str, int], bool]] = []
        front: Front

        def record(op: str) -> None:
            counts: dict[str, int] = {}
            for model in workers.values():
                counts[model] = counts.get(model, 0) + 1
            answered_by_new = front.models is not None and "http://new:1" in front.models["alpha"]
            seen.append((op, counts, answered_by_new))

        async def list_workers(request: web.Request) -> web.Response:
            return web.json_response(
                {"workers": [{"url": u, "model_id": m} for u, m in workers.items()]}
            )

        async def add(request: web.Request) -> web.Response:
            payload = await request.json()
            workers[payload["url"]] = payload["model_id"]
            record(f"add {payload['url']}")
            return web.json_response({"id": payload["url"]})

        async def remove(request: web.Request) -> web.Response:
            url = unquote(request.match_info["url"])
            workers.pop(url, None)
            record(f"remove {url}")
            return web.json_response({})

        app = web.Application()
        app.router.add_get("/workers", list_workers)
        app.router.add_post("/workers", add)
        app.router.add_delete("/workers/{url:.*}", remove)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        front = Front(f"http://127.0.0.1:{port}", b"k" * 32, 5.0)
        await front.start(app)
        front.models = {"alpha": ("http://old:1",), "beta": ("http://beta:1",)}
        front.desired = {"alpha": ("http://new:1",), "beta": ("http://beta:1",)}
        await front.sync()
        await front.close(app)
        await runner.cleanup()
        assert workers == {"http://new:1": "alpha", "http://beta:1": "beta"}
        return seen

    seen = asyncio.run(scenario())
    assert [op for op, _, _ in seen] == ["add http://new:1", "remove http://old:1"]
    assert all(counts.get("alpha", 0) >= 1 for _, counts, _ in seen), seen
    # The front switched to the new state only after the new worker was in the router.
    assert seen[0][2] is False and seen[1][2] is True


def test_models_that_scale_from_zero_are_listed_without_a_backend() -> None:
    body = front.models_body({"a": (), "b": (), "c": ("http://x:1",)}, 1, frozenset({"a"}))
    assert [m["id"] for m in body["data"]] == ["a", "c"]


def test_the_hold_settings_are_parsed_and_refused_when_malformed() -> None:
    assert front.parse_hold(None) == front.HoldPolicy()  # an operator from before: hold nothing
    pushed = {"models": ["a"], "maxWaitSeconds": 60, "maxQueuedRequests": 5, "retryAfterSeconds": 9}
    assert front.parse_hold(pushed) == front.HoldPolicy(frozenset({"a"}), 60.0, 5, 9)
    for bad in ("x", {**pushed, "models": "a"}, {**pushed, "maxWaitSeconds": 0},
                {**pushed, "retryAfterSeconds": True}, {**pushed, "maxQueuedRequests": None}):
        with pytest.raises(ValueError):
            front.parse_hold(bad)


def test_a_long_poll_of_load_answers_when_a_request_is_held_and_says_so() -> None:
    """GET /load?heldWait=S (the operator, while a model this gateway serves is at zero):
    answered as soon as a request is held, with the held count, not after the wait; without
    a held request it answers after the wait; a plain GET /load answers at once."""
    import asyncio
    import time

    from aiohttp import ClientSession, web

    from npuswarm.gateway import protocol
    from npuswarm.gateway.front import Front, HoldPolicy, build_apps

    credential = b"k" * 32
    signer = protocol.Signer()

    async def get_load(session: ClientSession, port: int, query: str) -> tuple[dict[str, object], float]:
        headers = signer.headers(credential, "GET", "/load", b"")
        started = time.monotonic()
        async with session.get(f"http://127.0.0.1:{port}/load{query}", headers=headers) as answer:
            assert answer.status == 200, await answer.text()
            return await answer.json(), time.monotonic() - started

    async def scenario() -> None:
        front = Front("http://127.0.0.1:1", credential, 5.0)
        front.models = front.desired = {"sleepy": ()}
        front.hold = HoldPolicy(frozenset({"sleepy"}), max_wait=60)
        _, admin = build_apps(front)
        runner = web.AppRunner(admin)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with ClientSession() as session:
            plain, _ = await get_load(session, port, "")
            assert plain["demand"]["sleepy"]["held"] == 0  # type: ignore[index]
            quiet, waited = await get_load(session, port, "?heldWait=0.3")
            assert quiet["demand"]["sleepy"]["held"] == 0 and waited >= 0.3  # type: ignore[index]
            polling = asyncio.create_task(get_load(session, port, "?heldWait=30"))
            holding = asyncio.create_task(front.wait_for_backend("sleepy"))
            answer, _ = await asyncio.wait_for(polling, 10)  # not the 30 s wait
            assert answer["demand"]["sleepy"]["held"] == 1  # type: ignore[index]
            holding.cancel()
        await runner.cleanup()

    asyncio.run(scenario())


def test_the_long_poll_wait_is_bounded_and_anything_else_means_answer_now() -> None:
    from npuswarm.gateway import load

    assert load.held_wait("2.5") == 2.5
    assert load.held_wait("1e9") == load.MAX_HELD_WAIT_SECONDS
    for bad in (None, "", "-1", "nan", "inf", "soon"):
        assert load.held_wait(bad) == 0.0
