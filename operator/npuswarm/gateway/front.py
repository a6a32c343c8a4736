"""The front process of a ModelGateway container (``npuswarm gateway-front``).

vllm-router does the routing (per-model policies, retries, circuit breakers, health checks);
this process adds only what it lacks (docs/gateway.md, "What vllm-router lacks"):

- ``GET /v1/models`` in OpenAI's shape, listing exactly the models with a ready backend;
- an OpenAI-style 404 for a model the gateway does not serve and a 503 for one it serves
  with no ready replica, where vllm-router would forward the request to another model's
  worker;
- one full-state admin call, ``PUT /backends`` with ``{"models": {model: [url, ...]}}``,
  that npuswarm pushes and that is reconciled into vllm-router's ``/workers``. It is
  idempotent, and the state is re-applied every few seconds, so a restarted vllm-router or
  gateway is refilled by the next push or the next sync. The admin port speaks only TLS,
  with the certificate npuswarm issued for this gateway, and takes only requests signed
  with this gateway's own credential (gateway/protocol.py); both come as Swarm secrets.

The public port serves OpenAI's routes and health only. Model requests are streamed to
vllm-router on loopback chunk by chunk, never buffered; anything else (vllm-router's own
worker admin API among it) is answered 404 here and never reaches the router.
vllm-router runs as a child process; if it exits, so does this process (Swarm restarts the
task).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import ssl
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web

from npuswarm.gateway import admission, load, protocol

# The only routes the public port forwards, all POST with a JSON body naming the model: the
# OpenAI-style routes vllm-router 0.1.17 routes by model (read off its binary: docs/gateway.md).
# Everything else it serves on the same port (its worker admin API /workers, /add_worker,
# /remove_worker, /list_workers, /flush_cache, profiling, /get_loads, /get_server_info,
# /v1/responses/{id}, ...) is answered 404 here and never reaches it.
MODEL_ROUTES = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/rerank",
        "/rerank",
        "/generate",
    }
)
# Hop-by-hop headers (RFC 9110 7.6.1) and those aiohttp sets itself.
HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
MAX_BODY = 64 * 1024 * 1024


# --- pure parts -----------------------------------------------------------------------------


def openai_error(
    status: int,
    message: str,
    type_: str,
    code: str,
    param: str | None,
    retry_after: int | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return web.json_response(body, status=status, headers=headers)


def models_body(
    models: Mapping[str, tuple[str, ...]], created: int, waking: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """OpenAI's model list: the models that have at least one ready backend, and those that
    scale from zero (a request for one is held while a replica starts), sorted."""
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "npuswarm"}
            for name, backends in sorted(models.items())
            if backends or name in waking
        ],
    }


def unknown_model(model: str) -> web.Response:
    return openai_error(
        404,
        f"The model `{model}` does not exist.",
        "invalid_request_error",
        "model_not_found",
        "model",
    )


def refusal(model: object, models: Mapping[str, tuple[str, ...]] | None) -> web.Response | None:
    """The answer the gateway gives itself instead of forwarding, or None to forward."""
    if models is None:
        return openai_error(
            503,
            "the gateway has not received its backends from npuswarm yet",
            "service_unavailable",
            "gateway_not_configured",
            None,
        )
    if not isinstance(model, str) or not model:
        return openai_error(
            400, "the request names no model", "invalid_request_error", "model_required", "model"
        )
    if model not in models:
        return unknown_model(model)
    if not models[model]:
        return openai_error(
            503,
            f"The model `{model}` has no ready replica.",
            "service_unavailable",
            "model_not_ready",
            "model",
        )
    return None


@dataclass(frozen=True)
class HoldPolicy:
    """Scale from zero at this gateway (pushed with the backends, ``scaleFromZero``): a
    request for one of ``models`` while it has no ready backend waits for one, at most
    ``max_wait`` seconds and ``max_queued`` requests per model; then 503 model_not_ready
    with Retry-After. A push without it (an older operator) holds nothing."""

    models: frozenset[str] = frozenset()
    max_wait: float = 300.0
    max_queued: int = 100
    retry_after: int = 30


def parse_hold(value: object) -> HoldPolicy:
    """The push's ``scaleFromZero`` (absent: hold nothing); ValueError when malformed."""
    if value is None:
        return HoldPolicy()
    if not isinstance(value, dict):
        raise ValueError("scaleFromZero must be an object")
    models = value.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        raise ValueError("scaleFromZero.models must be a list of model names")
    keys = ("maxWaitSeconds", "maxQueuedRequests", "retryAfterSeconds")
    numbers = {key: value.get(key) for key in keys}
    for key, number in numbers.items():
        if not isinstance(number, int) or isinstance(number, bool) or not 1 <= number <= 100000:
            raise ValueError(f"scaleFromZero.{key} must be an integer from 1 to 100000")
    return HoldPolicy(
        frozenset(models),
        float(numbers["maxWaitSeconds"]),  # type: ignore[arg-type]
        int(numbers["maxQueuedRequests"]),  # type: ignore[arg-type]
        int(numbers["retryAfterSeconds"]),  # type: ignore[arg-type]
    )


def not_ready_yet(model: str, why: str, retry_after: int) -> web.Response:
    """A held request that cannot be served: OpenAI's 503, and when to try again."""
    return openai_error(
        503,
        f"The model `{model}` has no ready replica: {why}.",
        "service_unavailable",
        "model_not_ready",
        "model",
        retry_after=retry_after,
    )


def parse_state(body: object) -> dict[str, tuple[str, ...]]:
    """The admin PUT's body: ``{"models": {name: [url, ...]}}``; ValueError when malformed."""
    if not isinstance(body, dict) or not isinstance(body.get("models"), dict):
        raise ValueError('expected {"models": {model: [url, ...]}}')
    state: dict[str, tuple[str, ...]] = {}
    owner: dict[str, str] = {}
    for model, urls in body["models"].items():
        if not isinstance(model, str) or not model:
            raise ValueError("model names must be non-empty strings")
        if not isinstance(urls, list) or not all(
            isinstance(u, str) and u.startswith("http://") for u in urls
        ):
            raise ValueError(f"backends of {model!r} must be a list of http:// URLs")
        for url in urls:
            if owner.setdefault(url, model) != model:
                raise ValueError(f"{url} is given for both {owner[url]!r} and {model!r}")
        state[model] = tuple(sorted(set(urls)))
    return state


@dataclass(frozen=True)
class WorkerDiff:
    add: list[tuple[str, str]] = field(default_factory=list)  # (url, model)
    remove: list[str] = field(default_factory=list)  # urls


def worker_diff(
    desired: Mapping[str, tuple[str, ...]], registered: Sequence[Mapping[str, Any]]
) -> WorkerDiff:
    """What to POST and DELETE on vllm-router's /workers so it holds exactly ``desired``.

    A worker is keyed by URL in vllm-router; one registered under another model is removed
    and added again (see Front.sync for the order)."""
    wanted = {url: model for model, urls in desired.items() for url in urls}
    have = {str(w.get("url")): str(w.get("model_id")) for w in registered}
    remove = sorted(url for url, model in have.items() if wanted.get(url) != model)
    add = sorted((url, model) for url, model in wanted.items() if have.get(url) != model)
    return WorkerDiff(add=add, remove=remove)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# --- the process ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestLimits:
    """What one client can make a replica hold (ModelGateway spec.requestLimits)."""

    max_body_bytes: int = MAX_BODY
    body_timeout_seconds: float = 30.0
    max_in_flight: int = 1024


# The end of a response kept to read its `usage` from (a stream's last chunks hold it).
USAGE_TAIL_BYTES = 8192
# Backends' /metrics read at once, and how long one may take (a stuck engine must not hold
# the others' readings back).
SCRAPE_CONCURRENCY = 8
SCRAPE_TIMEOUT_SECONDS = 2.0
MAX_METRICS_BYTES = 4 * 1024 * 1024


class Front:
    def __init__(
        self,
        router_url: str,
        credential: bytes | None,
        sync_seconds: float,
        limits: RequestLimits = RequestLimits(),
        clock: Callable[[], float] = time.monotonic,
        scrape_seconds: float = 2.0,
    ) -> None:
        self.router_url = router_url
        self.verifier = protocol.Verifier(credential)
        # Reads of /load have their own order of timestamps: the operator's autoscaler and
        # its pushes sign concurrently, and a read must not make a push look replayed.
        self.load_verifier = protocol.Verifier(credential)
        self.scrape_seconds = scrape_seconds
        self.clock = clock
        # The backends' engine load, per model and URL, and when it was last read.
        self.readings: dict[str, dict[str, load.Reading]] = {}
        self.scrape_errors: dict[str, str] = {}
        self.scraped_at: float | None = None
        self.sync_seconds = sync_seconds
        self.limits = limits
        # Who may call, and how fast: pushed with the backends (gateway/admission.py).
        self.access = admission.OPEN
        self.limiter = admission.Limiter(clock)
        self.in_flight = 0
        # What requests are answered by: None until npuswarm's first push is in vllm-router
        # (the gateway cannot tell unknown from not ready before).
        self.models: dict[str, tuple[str, ...]] | None = None
        # The last pushed state, which sync() brings vllm-router to.
        self.desired: dict[str, tuple[str, ...]] | None = None
        self.created = int(time.time())
        # Scale from zero: what to hold (pushed), what is held and what ran, per model.
        self.hold = HoldPolicy()
        self.held: dict[str, int] = {}
        self.active: dict[str, int] = {}
        self.last_request: dict[str, float] = {}
        self.started_at = clock()
        # Notified whenever the served state changes: held requests look again.
        self.state_changed = asyncio.Condition()
        # Notified when a request starts being held: a GET /load?heldWait= waiting for one
        # answers at once (the operator wakes the model without waiting for its next read).
        self.hold_started = asyncio.Condition()
        self.lock = asyncio.Lock()
        self.session: aiohttp.ClientSession | None = None
        self.last_sync_error: str | None = None

    async def start(self, app: web.Application) -> None:
        # No total timeout: a stream lasts as long as the model generates.
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            connector=aiohttp.TCPConnector(limit=0),
            auto_decompress=False,
        )

    async def close(self, app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    # public port ------------------------------------------------------------------------
    def _client(self, request: web.Request) -> admission.Client | web.Response:
        found = self.access.client(request.headers.get("Authorization"))
        if isinstance(found, str):
            return openai_error(401, found, "invalid_request_error", "invalid_api_key", None)
        return found

    def demand(self) -> dict[str, load.Demand]:
        """Each served model's demand here, for GET /load (the operator wakes a model at
        zero that holds requests, and lets a model idle for its window go to zero)."""
        now = self.clock()
        found = {}
        for model in self.desired or {}:
            if self.active.get(model) or self.held.get(model):
                idle = 0.0
            else:
                idle = now - max(self.started_at, self.last_request.get(model, self.started_at))
            found[model] = load.Demand(self.held.get(model, 0), max(0.0, idle))
        return found

    async def wait_for_backend(self, model: str) -> web.Response | None:
        """Hold a request for a model scaled to zero until it has a ready backend (None:
        forward it now), or answer 503 with Retry-After: the queue is full, or none came
        within the wait."""
        hold = self.hold
        if self.held.get(model, 0) >= hold.max_queued:
            return not_ready_yet(
                model, f"{hold.max_queued} requests already wait for it to start", hold.retry_after
            )
        self.held[model] = self.held.get(model, 0) + 1
        async with self.hold_started:
            self.hold_started.notify_all()
        try:
            async with self.state_changed:
                await asyncio.wait_for(
                    self.state_changed.wait_for(lambda: not self._waits(model)), hold.max_wait
                )
            return None
        except TimeoutError:
            return not_ready_yet(
                model, f"no replica started within {hold.max_wait:g} s", hold.retry_after
            )
        finally:
            self.held[model] -= 1
            self.last_request[model] = self.clock()

    def _waits(self, model: str) -> bool:
        """Whether a request for ``model`` is held rather than answered now."""
        return (
            self.models is not None
            and model in self.models
            and not self.models[model]
            and model in self.hold.models
        )

    def _visible(self, client: admission.Client) -> dict[str, tuple[str, ...]]:
        models = self.models or {}
        if client.models is None:
            return models
        return {name: urls for name, urls in models.items() if name in client.models}

    def _listing(self, request: web.Request) -> dict[str, Any] | web.Response:
        """The models this client may see, as OpenAI lists them, or the refusal to send."""
        if self.models is None:
            refused = refusal(None, None)
            assert refused is not None
            return refused
        client = self._client(request)
        if isinstance(client, web.Response):
            return client
        return models_body(self._visible(client), self.created, self.hold.models)

    async def list_models(self, request: web.Request) -> web.Response:
        listed = self._listing(request)
        if isinstance(listed, web.Response):
            return listed
        return web.json_response(listed)

    async def health(self, request: web.Request) -> web.Response:
        assert self.session is not None
        try:
            async with self.session.get(f"{self.router_url}/health") as answer:
                ok = answer.status == 200
        except aiohttp.ClientError:
            ok = False
        return web.json_response(
            {"router": ok, "configured": self.models is not None}, status=200 if ok else 503
        )

    async def get_model(self, request: web.Request) -> web.Response:
        """OpenAI's retrieve-model call, answered from the same state as the list."""
        listed = self._listing(request)
        if isinstance(listed, web.Response):
            return listed
        found = next((m for m in listed["data"] if m["id"] == request.match_info["model"]), None)
        if found is None:
            return unknown_model(request.match_info["model"])
        return web.json_response(found)

    async def not_found(self, request: web.Request) -> web.Response:
        return openai_error(
            404,
            f"{request.method} {request.path} is not served here",
            "invalid_request_error",
            "not_found",
            None,
        )

    async def forward(self, request: web.Request) -> web.StreamResponse:
        """Key, then load, then rate, then the body (bounded in size and time), then the
        model: a refused request costs the gateway as little as possible."""
        client = self._client(request)
        if isinstance(client, web.Response):
            return client
        if self.in_flight >= self.limits.max_in_flight:
            return openai_error(
                503,
                "the gateway has too many requests in flight",
                "service_unavailable",
                "gateway_overloaded",
                None,
                retry_after=1,
            )
        wait = self.limiter.admit(client)
        if wait is not None:
            return openai_error(
                429,
                f"rate limit reached for {client.name}",
                "requests",
                "rate_limit_exceeded",
                None,
                retry_after=wait,
            )
        self.in_flight += 1
        try:
            return await self._forward(request, client)
        finally:
            self.in_flight -= 1

    async def _forward(self, request: web.Request, client: admission.Client) -> web.StreamResponse:
        try:
            body = await asyncio.wait_for(request.read(), self.limits.body_timeout_seconds)
        except web.HTTPRequestEntityTooLarge:
            return openai_error(
                413,
                f"the request body is larger than {self.limits.max_body_bytes} bytes",
                "invalid_request_error",
                "request_too_large",
                None,
            )
        except TimeoutError:
            return openai_error(
                408,
                "the request body did not arrive in time",
                "invalid_request_error",
                "request_timeout",
                None,
            )
        try:
            model = json.loads(body or b"{}").get("model")
        except (ValueError, AttributeError):
            return openai_error(
                400, "the body is not a JSON object", "invalid_request_error", "bad_json", None
            )
        if isinstance(model, str) and self._waits(model) and model in self._visible(client):
            self.last_request[model] = self.clock()
            held = await self.wait_for_backend(model)
            if held is not None:
                return held
        refused = refusal(model, self._visible(client) if self.models is not None else None)
        if refused is not None:
            return refused
        assert self.session is not None
        assert isinstance(model, str)
        self.active[model] = self.active.get(model, 0) + 1
        try:
            return await self._send(request, client, model, body)
        finally:
            self.active[model] -= 1
            self.last_request[model] = self.clock()

    async def _send(
        self, request: web.Request, client: admission.Client, model: str, body: bytes
    ) -> web.StreamResponse:
        assert self.session is not None
        # The client's key is the gateway's business: replicas never see (or log) it.
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in HOP_HEADERS and k.lower() != "authorization"
        }
        try:
            upstream = await self.session.request(
                request.method,
                self.router_url + request.rel_url.raw_path_qs,
                data=body,
                headers=headers,
            )
        except aiohttp.ClientError as error:
            return openai_error(
                502, f"router unreachable: {error}", "service_unavailable", "bad_gateway", None
            )
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in HOP_HEADERS:
                    response.headers.add(key, value)
            await response.prepare(request)
            tail = b""
            # Each chunk as it arrives: a streamed completion reaches the client token by token.
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
                tail = (tail + chunk)[-USAGE_TAIL_BYTES:]
            await response.write_eof()
            self.limiter.spent(client, admission.usage_tokens(tail))
            return response

    # admin port -------------------------------------------------------------------------
    async def _refused(self, request: web.Request, body: bytes) -> web.Response | None:
        refused = self.verifier.refusal(
            request.headers.get("Authorization"), request.method, request.path, body, now_ms()
        )
        if refused is None:
            return None
        log(f"admin request refused ({request.method} {request.path}): {refused}")
        return web.json_response({"error": f"unauthorised: {refused}"}, status=401)

    async def put_backends(self, request: web.Request) -> web.Response:
        body = await request.read()
        refused = await self._refused(request, body)
        if refused is not None:
            return refused
        try:
            pushed = json.loads(body)
            state = parse_state(pushed)
            access = admission.parse_access(pushed.get("access"))
            hold = parse_hold(pushed.get("scaleFromZero"))
        except ValueError as error:
            return web.json_response({"error": str(error)}, status=400)
        # Keys and limits take effect at once (a rotated key works from this answer on).
        self.access = access
        self.hold = hold
        self.desired = state
        try:
            await self.sync()
        except (aiohttp.ClientError, RouterRefused) as error:
            # Kept: the sync loop retries; the caller learns its push is not in effect yet.
            return web.json_response({"error": f"router not updated: {error}"}, status=502)
        return web.json_response({"models": {m: list(u) for m, u in state.items()}})

    async def get_load(self, request: web.Request) -> web.Response:
        """The engines' load per model, as last scraped (signed like every admin call)."""
        refused = self.load_verifier.refusal(
            request.headers.get("Authorization"), request.method, request.path, b"", now_ms()
        )
        if refused is not None:
            log(f"admin request refused (GET /load): {refused}")
            return web.json_response({"error": f"unauthorised: {refused}"}, status=401)
        wait = load.held_wait(request.query.get(load.HELD_WAIT))
        if wait > 0:
            # A long poll: the operator asks while a model it serves is at zero, and the
            # answer comes as soon as a request is held here (or after the wait).
            async with self.hold_started:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self.hold_started.wait_for(lambda: any(self.held.values())), wait
                    )
        age = -1.0 if self.scraped_at is None else self.clock() - self.scraped_at
        return web.json_response(
            load.load_body(self.readings, self.scrape_errors, age, self.demand())
        )

    async def scrape(self) -> None:
        """Every backend's /metrics once, SCRAPE_CONCURRENCY at a time, each bounded by
        SCRAPE_TIMEOUT_SECONDS; a backend that fails is left out (and named) this round."""
        desired = self.desired or {}
        assert self.session is not None
        session = self.session
        gate = asyncio.Semaphore(SCRAPE_CONCURRENCY)
        readings: dict[str, dict[str, load.Reading]] = {}
        errors: dict[str, str] = {}

        async def one(model: str, url: str) -> None:
            async with gate:
                try:
                    async with session.get(
                        f"{url}/metrics",
                        timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_SECONDS),
                    ) as answer:
                        if answer.status != 200:
                            errors[url] = f"GET /metrics answered {answer.status}"
                            return
                        text = await answer.content.read(MAX_METRICS_BYTES)
                except (aiohttp.ClientError, TimeoutError) as error:
                    errors[url] = f"GET /metrics: {error or type(error).__name__}"
                    return
            reading = load.parse_metrics(text.decode(errors="replace"))
            if reading is None:
                errors[url] = "its /metrics has no vLLM request gauges"
            else:
                readings.setdefault(model, {})[url] = reading

        await asyncio.gather(*(one(m, u) for m, urls in desired.items() for u in urls))
        self.readings, self.scrape_errors = readings, errors
        self.scraped_at = self.clock()

    async def scrape_forever(self) -> None:
        while True:
            try:
                await self.scrape()
            except Exception as error:  # the next round tries again; serving goes on
                log(f"reading the backends' load failed: {error!r}")
            await asyncio.sleep(self.scrape_seconds)

    async def get_backends(self, request: web.Request) -> web.Response:
        refused = await self._refused(request, b"")
        if refused is not None:
            return refused
        workers = await self.workers()
        return web.json_response(
            {
                "models": None
                if self.models is None
                else {m: list(u) for m, u in self.models.items()},
                "workers": workers,
                "lastSyncError": self.last_sync_error,
                "keys": len(self.access.keys),
            }
        )

    # vllm-router's worker registry --------------------------------------------------------
    async def workers(self) -> list[dict[str, Any]]:
        assert self.session is not None
        async with self.session.get(f"{self.router_url}/workers") as answer:
            if answer.status != 200:
                raise RouterRefused(f"GET /workers answered {answer.status}")
            listed: list[dict[str, Any]] = (await answer.json()).get("workers") or []
            return listed

    async def sync(self) -> None:
        """Make vllm-router's workers exactly the pushed state.

        vllm-router sends a request for a model without workers to another model's worker,
        so no model that keeps backends may drop to zero workers in between: new workers are
        added first, then requests are answered by the new state (a model left without
        backends gets 503 from here on), then the unwanted workers go. All of it happens
        before the push is answered, i.e. before npuswarm stops any replica it removed."""
        desired = self.desired
        if desired is None:
            return
        assert self.session is not None
        async with self.lock:
            registered = await self.workers()
            diff = worker_diff(desired, registered)
            have = {str(w.get("url")) for w in registered}
            fresh = [(url, model) for url, model in diff.add if url not in have]
            moved = [(url, model) for url, model in diff.add if url in have]
            await self._add(fresh)
            self.models = desired
            async with self.state_changed:
                self.state_changed.notify_all()
            for url in diff.remove:
                async with self.session.delete(
                    f"{self.router_url}/workers/{quote(url, safe='')}"
                ) as answer:
                    if answer.status not in (200, 404):
                        raise RouterRefused(
                            f"DELETE worker {url}: {answer.status} {await answer.text()}"
                        )
            # A URL registered under another model can only be added again once removed.
            await self._add(moved)

    async def _add(self, workers: Sequence[tuple[str, str]]) -> None:
        assert self.session is not None
        for url, model in workers:
            payload = {"url": url, "model_id": model}
            async with self.session.post(f"{self.router_url}/workers", json=payload) as answer:
                if answer.status != 200:
                    raise RouterRefused(f"POST worker {url}: {answer.status} {await answer.text()}")

    async def sync_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sync_seconds)
            try:
                await self.sync()
                self.last_sync_error = None
            except (aiohttp.ClientError, RouterRefused) as error:
                self.last_sync_error = str(error)
                log(f"sync with vllm-router failed: {error}")


class RouterRefused(Exception):
    pass


def log(message: str) -> None:
    print(f"npuswarm-gateway: {message}", file=sys.stderr, flush=True)


def router_command(args: argparse.Namespace) -> list[str]:
    return [
        args.router_binary,
        "--enable-igw",
        "--host",
        "127.0.0.1",
        "--port",
        str(args.router_port),
        "--policy",
        args.policy,
        "--health-check-interval-secs",
        str(args.health_interval),
        "--health-check-timeout-secs",
        str(args.health_timeout),
        "--health-failure-threshold",
        str(args.health_failures),
        "--health-check-endpoint",
        "/health",
        "--prometheus-host",
        "0.0.0.0",
        "--prometheus-port",
        str(args.metrics_port),
        "--log-level",
        "warning",
    ]


def default_router_binary() -> str:
    """The vllm-router installed beside this Python (the wheel's script), else from PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "vllm-router")
    return beside if os.path.exists(beside) else "vllm-router"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="npuswarm gateway-front")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--admin-port", type=int, default=8079)
    parser.add_argument("--router-port", type=int, default=30000)
    parser.add_argument("--metrics-port", type=int, default=29000)
    parser.add_argument("--router-binary", default=default_router_binary())
    parser.add_argument("--policy", default="cache_aware")
    parser.add_argument("--health-interval", type=int, default=5)
    parser.add_argument("--health-timeout", type=int, default=3)
    parser.add_argument("--health-failures", type=int, default=2)
    parser.add_argument("--sync-seconds", type=float, default=5.0)
    parser.add_argument(
        "--scrape-seconds",
        type=float,
        default=2.0,
        help="how often the backends' /metrics are read for GET /load (the autoscaler)",
    )
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY)
    parser.add_argument("--body-timeout", type=float, default=30.0)
    parser.add_argument("--max-in-flight", type=int, default=1024)
    parser.add_argument(
        "--secrets-dir",
        default=protocol.SECRETS_DIR,
        help="where npuswarm's Swarm secrets are mounted: the credential and the TLS key",
    )
    return parser.parse_args(argv)


def build_apps(front: Front) -> tuple[web.Application, web.Application]:
    public = web.Application(client_max_size=front.limits.max_body_bytes)
    public.router.add_get("/v1/models", front.list_models)
    public.router.add_get("/v1/models/{model:.+}", front.get_model)
    public.router.add_get("/health", front.health)
    for route in sorted(MODEL_ROUTES):
        public.router.add_post(route, front.forward)
    public.router.add_route("*", "/{tail:.*}", front.not_found)
    public.on_startup.append(front.start)
    public.on_cleanup.append(front.close)
    admin = web.Application()
    admin.router.add_put("/backends", front.put_backends)
    admin.router.add_get("/backends", front.get_backends)
    admin.router.add_get("/load", front.get_load)
    return public, admin


async def wait_for_router(front: Front, router: asyncio.subprocess.Process) -> None:
    assert front.session is not None
    while router.returncode is None:
        try:
            async with front.session.get(f"{front.router_url}/health") as answer:
                if answer.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)  # polling a child process's port until it listens
    raise SystemExit(f"vllm-router exited with {router.returncode} before listening")


def read_secrets(directory: str) -> tuple[bytes, ssl.SSLContext]:
    """This gateway's credential and the TLS context of its admin port; SystemExit naming
    what is missing (without them no push could ever be accepted)."""
    credential_path = os.path.join(directory, protocol.CREDENTIAL_FILE)
    tls_path = os.path.join(directory, protocol.TLS_FILE)
    try:
        with open(credential_path, encoding="ascii") as file:
            credential = protocol.parse_credential(file.read())
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(tls_path)
    except (OSError, ValueError, ssl.SSLError) as error:
        raise SystemExit(
            f"npuswarm-gateway: cannot read this gateway's secrets in {directory} "
            f"({error}); npuswarm mounts them as Swarm secrets"
        ) from None
    return credential, context


async def run(args: argparse.Namespace) -> int:
    credential, tls = read_secrets(args.secrets_dir)
    router = await asyncio.create_subprocess_exec(*router_command(args))
    limits = RequestLimits(args.max_body_bytes, args.body_timeout, args.max_in_flight)
    front = Front(
        f"http://127.0.0.1:{args.router_port}",
        credential,
        args.sync_seconds,
        limits,
        scrape_seconds=args.scrape_seconds,
    )
    public, admin = build_apps(front)
    public_runner, admin_runner = web.AppRunner(public), web.AppRunner(admin)
    await public_runner.setup()
    await admin_runner.setup()
    await wait_for_router(front, router)
    await web.TCPSite(public_runner, "0.0.0.0", args.port).start()
    await web.TCPSite(admin_runner, "0.0.0.0", args.admin_port, ssl_context=tls).start()
    log(f"serving on :{args.port}, admin on :{args.admin_port}, vllm-router on :{args.router_port}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    syncing = asyncio.create_task(front.sync_forever())
    scraping = asyncio.create_task(front.scrape_forever())
    router_exit = asyncio.create_task(router.wait())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({router_exit, stopping}, return_when=asyncio.FIRST_COMPLETED)
    syncing.cancel()
    scraping.cancel()
    code = 0
    if router_exit.done():
        log(f"vllm-router exited with {router.returncode}")
        code = 1
    else:
        router.terminate()
        await router.wait()
    await public_runner.cleanup()
    await admin_runner.cleanup()
    return code


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
