"""Which client requests a gateway replica admits: API keys, the models a key may use, and rate
limits per key (docs/security.md, "Client access"). Standard library only: the gateway front
imports it. The operator pushes the ``access`` state (gateway/access.py builds it).

Rate limits are token buckets that refill continuously: ``rpm`` requests a minute is a bucket
of ``rpm`` that refills ``rpm / 60`` a second. Tokens (``tpm``) are counted when a response
ends, from the ``usage`` the engine reports, so a key may go into debt by one response and is
then refused until the debt is paid back by the refill.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

ANONYMOUS = "anonymous"
_USAGE_TOTAL = re.compile(rb'"total_tokens"\s*:\s*(\d+)')


@dataclass(frozen=True)
class Rates:
    rpm: int = 0  # 0: no limit
    tpm: int = 0


@dataclass(frozen=True)
class Client:
    """Who a request is from, as far as limits go."""

    name: str  # a key's name, or ANONYMOUS
    models: frozenset[str] | None  # None: every model
    rates: Rates


@dataclass(frozen=True)
class Access:
    """The pushed access state."""

    anonymous: Client | None  # None: a key is required
    keys: Mapping[str, Client] = field(default_factory=dict)  # digest -> client

    def client(self, authorization: str | None) -> Client | str:
        """The client a request's Authorization header names, or why it is refused."""
        if not authorization:
            return self.anonymous or "no API key given (Authorization: Bearer <key>)"
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return "the Authorization header is not 'Bearer <key>'"
        found = self.keys.get(hashlib.sha256(key.strip().encode()).hexdigest())
        return found if found is not None else "the API key is not valid"


OPEN = Access(anonymous=Client(ANONYMOUS, None, Rates()))


def _rates(raw: Mapping[str, Any]) -> Rates:
    rpm, tpm = raw.get("rpm", 0), raw.get("tpm", 0)
    if not isinstance(rpm, int) or not isinstance(tpm, int) or rpm < 0 or tpm < 0:
        raise ValueError("rpm and tpm are non-negative integers")
    return Rates(rpm, tpm)


def parse_access(raw: object) -> Access:
    """The ``access`` of a push; absent (an operator before 0.2): anyone, no limit.
    ValueError when malformed."""
    if raw is None:
        return OPEN
    if not isinstance(raw, dict):
        raise ValueError("access must be an object")
    anonymous = raw.get("anonymous", {})
    keys = raw.get("keys", {})
    if not isinstance(anonymous, dict) or not isinstance(keys, dict):
        raise ValueError("access.anonymous and access.keys must be objects")
    clients: dict[str, Client] = {}
    for digest, entry in keys.items():
        if not re.fullmatch(r"[0-9a-f]{64}", str(digest)) or not isinstance(entry, dict):
            raise ValueError("access.keys maps SHA-256 digests to objects")
        models = entry.get("models")
        if models is not None and not (
            isinstance(models, list) and all(isinstance(m, str) for m in models)
        ):
            raise ValueError("a key's models must be a list of names")
        clients[digest] = Client(
            str(entry.get("name", "")),
            None if models is None else frozenset(models),
            _rates(entry),
        )
    guest = Client(ANONYMOUS, None, _rates(anonymous)) if anonymous.get("allowed") else None
    return Access(anonymous=guest, keys=clients)


@dataclass
class Bucket:
    capacity: float
    level: float
    updated: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.capacity / 60)
        self.updated = now

    def wait_for(self, amount: float) -> float:
        """Seconds until the level reaches ``amount`` (0 when it already has)."""
        missing = amount - self.level
        return 0.0 if missing <= 0 else missing * 60 / self.capacity


class Limiter:
    """Token buckets per client; a client whose limits change gets fresh buckets."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._requests: dict[tuple[str, int], Bucket] = {}
        self._tokens: dict[tuple[str, int], Bucket] = {}

    def _bucket(self, buckets: dict[tuple[str, int], Bucket], name: str, limit: int) -> Bucket:
        key = (name, limit)
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = Bucket(limit, limit, self.clock())
        bucket.refill(self.clock())
        return bucket

    def admit(self, client: Client) -> int | None:
        """None when the request may go (and it is counted), else the seconds to wait
        (Retry-After, at least 1)."""
        waits = []
        requests = tokens = None
        if client.rates.rpm:
            requests = self._bucket(self._requests, client.name, client.rates.rpm)
            waits.append(requests.wait_for(1))
        if client.rates.tpm:
            tokens = self._bucket(self._tokens, client.name, client.rates.tpm)
            waits.append(tokens.wait_for(0))  # in debt: wait until it is paid back
        longest = max(waits, default=0.0)
        if longest > 0:
            return max(1, math.ceil(longest))
        if requests is not None:
            requests.level -= 1
        return None

    def spent(self, client: Client, tokens: int) -> None:
        if client.rates.tpm and tokens:
            self._bucket(self._tokens, client.name, client.rates.tpm).level -= tokens


def usage_tokens(tail: bytes) -> int:
    """The engine's ``usage.total_tokens`` in the end of a response (a JSON body, or the last
    chunks of a stream that asked for usage); 0 when it reports none."""
    found = _USAGE_TOTAL.findall(tail)
    return int(found[-1]) if found else 0
