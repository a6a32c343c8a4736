"""Engine load as a gateway reads it from its backends' /metrics and serves it on its admin
port (``GET /load``), and as the operator reads that answer back.

Standard library only: the gateway front, which runs in the gateway image, imports this.

vLLM's gauges (V1 engine): ``vllm:num_requests_waiting``, ``vllm:num_requests_running`` and
``vllm:kv_cache_usage_perc`` (a fraction, 0..1, despite its name), each labelled with
``model_name`` and ``engine``; V0 images report ``vllm:gpu_cache_usage_perc`` instead of the
last. A replica with several engines (data parallel) reports one sample per engine: counts
are summed, the cache usage averaged.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
KV_CACHE = "vllm:kv_cache_usage_perc"
KV_CACHE_V0 = "vllm:gpu_cache_usage_perc"
_WANTED = (WAITING, RUNNING, KV_CACHE, KV_CACHE_V0)
# name{labels} value [timestamp]; label values may hold anything quoted, escapes included.
_SAMPLE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?P<labels>(?:[^"}]|"(?:[^"\\]|\\.)*")*)\})?'
    r"\s+(?P<value>\S+)"
)


@dataclass(frozen=True)
class Reading:
    """One backend's engine load."""

    waiting: float
    running: float
    kv_cache: float | None  # None: the image reports neither cache gauge


def parse_metrics(text: str) -> Reading | None:
    """A vLLM /metrics page's load; None when it has neither request gauge (not vLLM)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if not line or line[0] == "#" or not line.startswith("vllm:"):
            continue
        found = _SAMPLE.match(line)
        if found is None or found.group("name") not in _WANTED:
            continue
        try:
            value = float(found.group("value"))
        except ValueError:
            continue
        if math.isnan(value) or math.isinf(value):
            continue
        name = found.group("name")
        sums[name] = sums.get(name, 0.0) + value
        counts[name] = counts.get(name, 0) + 1
    if WAITING not in sums and RUNNING not in sums:
        return None
    cache_name = KV_CACHE if KV_CACHE in sums else KV_CACHE_V0
    kv_cache = sums[cache_name] / counts[cache_name] if cache_name in sums else None
    return Reading(sums.get(WAITING, 0.0), sums.get(RUNNING, 0.0), kv_cache)


# GET /load?heldWait=SECONDS: answer once a request is held (or after that long). The query
# is not signed (the signature covers the path): it only bounds how long an answer waits.
HELD_WAIT = "heldWait"
MAX_HELD_WAIT_SECONDS = 30.0


def held_wait(value: str | None) -> float:
    """The long poll's wait in seconds: 0 (answer now) unless a number up to the maximum."""
    try:
        wait = float(value) if value is not None else 0.0
    except ValueError:
        return 0.0
    return min(wait, MAX_HELD_WAIT_SECONDS) if wait > 0 and math.isfinite(wait) else 0.0


@dataclass(frozen=True)
class Demand:
    """A model's demand as one gateway replica sees it: requests it holds while the model
    has no ready replica (scale from zero), and how long since a request for it last came
    or ended (0 while one is in flight; counted from the front's start if none came)."""

    held: int
    idle_seconds: float


def load_body(
    readings: Mapping[str, Mapping[str, Reading]],
    errors: Mapping[str, str],
    age: float,
    demand: Mapping[str, Demand] | None = None,
) -> dict[str, Any]:
    """``GET /load``'s answer: per model, per backend URL, its reading (backends whose
    /metrics failed are listed with their error, so the operator counts only real ones),
    and each model's demand at this gateway replica (``demand``: added for scale to zero;
    an operator that does not know it ignores it)."""
    return {
        "ageSeconds": round(age, 3),
        "demand": {
            model: {"held": d.held, "idleSeconds": round(d.idle_seconds, 1)}
            for model, d in sorted((demand or {}).items())
        },
        "models": {
            model: {
                url: {"waiting": r.waiting, "running": r.running, "kvCache": r.kv_cache}
                for url, r in sorted(backends.items())
            }
            for model, backends in sorted(readings.items())
        },
        "errors": dict(sorted(errors.items())),
    }


@dataclass(frozen=True)
class ModelLoad:
    """One model's load over the backends that reported it (each counted once)."""

    replicas: int
    waiting: float
    running: float
    kv_cache: float | None
    held: int = 0  # requests the gateway replicas hold for it (it has no ready replica)
    # The least idle time any gateway replica reports; None when one of them did not say
    # (a front from before scale to zero): then it is never taken for idle.
    idle_seconds: float | None = None


def merge(answers: Iterable[Mapping[str, Any]]) -> dict[str, ModelLoad]:
    """The gateways' ``/load`` answers into one load per model. Every replica of every
    gateway serving a model scrapes the same backends: each backend URL counts once (the
    first answer's reading of it). Each replica holds its own requests: those add up; a
    model is idle only as long as its least idle replica says. Malformed parts are
    skipped, never trusted."""
    seen: dict[str, dict[str, Reading]] = {}
    held: dict[str, int] = {}
    idle: dict[str, float | None] = {}
    for answer in answers:
        models = answer.get("models") if isinstance(answer, Mapping) else None
        if not isinstance(models, Mapping):
            continue
        demand = answer.get("demand")
        demand = demand if isinstance(demand, Mapping) else {}
        for model, values in demand.items():
            found = _demand(values)
            if not isinstance(model, str) or found is None:
                continue
            held[model] = held.get(model, 0) + found.held
            if model not in idle:
                idle[model] = found.idle_seconds
            elif (before := idle[model]) is not None:
                idle[model] = min(before, found.idle_seconds)
        for model in models:
            if isinstance(model, str) and model not in demand:
                idle[model] = None  # this replica does not report demand: never idle
        for model, backends in models.items():
            if not isinstance(model, str) or not isinstance(backends, Mapping):
                continue
            for url, values in backends.items():
                reading = _reading(values)
                if isinstance(url, str) and reading is not None:
                    seen.setdefault(model, {}).setdefault(url, reading)
    merged: dict[str, ModelLoad] = {}
    for model in seen.keys() | held.keys() | {m for m, s in idle.items() if s is not None}:
        backends = seen.get(model, {})
        caches = [r.kv_cache for r in backends.values() if r.kv_cache is not None]
        merged[model] = ModelLoad(
            replicas=len(backends),
            waiting=sum(r.waiting for r in backends.values()),
            running=sum(r.running for r in backends.values()),
            kv_cache=sum(caches) / len(caches) if caches else None,
            held=held.get(model, 0),
            idle_seconds=idle.get(model),
        )
    return merged


def _demand(values: object) -> Demand | None:
    if not isinstance(values, Mapping):
        return None
    count, idle = values.get("held"), values.get("idleSeconds")
    if not _number(count) or not _number(idle):
        return None
    return Demand(int(count), float(idle))  # type: ignore[arg-type]


def _reading(values: object) -> Reading | None:
    if not isinstance(values, Mapping):
        return None
    numbers = [values.get("waiting"), values.get("running")]
    cache = values.get("kvCache")
    if not all(_number(n) for n in numbers) or not (cache is None or _number(cache)):
        return None
    return Reading(float(numbers[0]), float(numbers[1]), None if cache is None else float(cache))  # type: ignore[arg-type]


def _number(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )
