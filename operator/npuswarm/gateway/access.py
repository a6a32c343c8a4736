"""Client access of a ModelGateway as pushed to its replicas: which API keys open it, for which
models, and at what rates (docs/security.md, "Client access"). Pure.

Keys travel only as SHA-256 digests: the operator reads the tenant's Secret, hashes every key
at once and keeps no key; the gateway compares the digest of what a client presents. So a key
is never in a status, an Event, a log line, the Swarm spec, or even the gateway's memory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from npuswarm.api.gateway import ClientAccess, RateLimit


def key_digest(key: bytes) -> str:
    return hashlib.sha256(key.strip()).hexdigest()


@dataclass(frozen=True)
class KeySet:
    """A keys Secret as the operator holds it: key name -> digest, and the version read."""

    digests: Mapping[str, str] = field(default_factory=dict)
    version: str = ""

    @classmethod
    def from_secret_data(cls, data: Mapping[str, bytes], version: str) -> KeySet:
        """Empty entries are no keys (an empty key would open the gateway to anyone)."""
        return cls({name: key_digest(v) for name, v in data.items() if v.strip()}, version)


def _rates(limit: RateLimit) -> dict[str, int]:
    return {"rpm": limit.requestsPerMinute, "tpm": limit.tokensPerMinute}


def access_state(access: ClientAccess, keys: KeySet | None) -> dict[str, Any]:
    """The ``access`` part of the pushed state. ``keys`` None: the Secret could not be read,
    and no key opens the gateway until it can (anonymous access as the spec says)."""
    if access.apiKeysSecret is None:
        return {"anonymous": {"allowed": True, **_rates(access.anonymous)}, "keys": {}}
    pushed: dict[str, Any] = {}
    for name, digest in sorted((keys.digests if keys else {}).items()):
        own = access.keys.get(name)
        pushed[digest] = {
            "name": name,
            "models": own.models if own is not None else None,
            **_rates(own if own is not None else access.perKey),
        }
    return {
        "anonymous": {"allowed": access.allowAnonymous, **_rates(access.anonymous)},
        "keys": pushed,
    }
