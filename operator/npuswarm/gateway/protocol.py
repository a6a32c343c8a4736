"""The admin channel between npuswarm and a ModelGateway replica: how a push is signed and
checked (docs/security.md, "The push channel").

Standard library only: the gateway front, which runs in the gateway image, imports this and
nothing else of npuswarm.

Every admin request carries ``Authorization: NPUSWARM-HMAC-SHA256 ts=<ms>,sig=<hex>``, an
HMAC-SHA256 with the gateway's own credential over the method, the path, the timestamp and
the SHA-256 of the body. The credential never travels: a reader of the network path (who
also faces TLS) learns nothing that opens this or any other gateway. A replica accepts only
timestamps later than the last it accepted and within ``MAX_SKEW_SECONDS`` of its clock, so a
recorded push replayed later, or two pushes reordered, change nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import re

SCHEME = "NPUSWARM-HMAC-SHA256"
# How far the operator's clock may be from a gateway node's; NTP keeps a fleet far closer.
MAX_SKEW_SECONDS = 300
# Where Swarm mounts a gateway's secrets in its container (tmpfs, never in the image or env).
SECRETS_DIR = "/run/secrets"
CREDENTIAL_FILE = "npuswarm-gateway-credential"
TLS_FILE = "npuswarm-gateway-tls.pem"
_HEADER = re.compile(rf"^{SCHEME} ts=(\d{{1,16}}),sig=([0-9a-f]{{64}})$")


def signature(credential: bytes, method: str, path: str, timestamp_ms: int, body: bytes) -> str:
    message = "\n".join(
        (method.upper(), path, str(timestamp_ms), hashlib.sha256(body).hexdigest())
    ).encode()
    return hmac.new(credential, message, hashlib.sha256).hexdigest()


def authorization(credential: bytes, method: str, path: str, timestamp_ms: int, body: bytes) -> str:
    """The Authorization header of one admin request."""
    signed = signature(credential, method, path, timestamp_ms, body)
    return f"{SCHEME} ts={timestamp_ms},sig={signed}"


def parse_credential(text: str) -> bytes:
    """A credential file's content (hex, as npuswarm writes it); ValueError when it is not."""
    value = bytes.fromhex(text.strip())
    if len(value) < 32:
        raise ValueError("a gateway credential has at least 32 bytes")
    return value


class Verifier:
    """One gateway replica's check of admin requests. Not thread-safe: the front calls it from
    its one event loop."""

    def __init__(self, credential: bytes | None) -> None:
        self.credential = credential
        self.last_accepted_ms = 0

    def refusal(
        self, header: str | None, method: str, path: str, body: bytes, now_ms: int
    ) -> str | None:
        """None when the request is authentic and fresh (and it is then the newest accepted),
        else why it is refused. Refusals say little: the caller is not trusted."""
        if self.credential is None:
            return "this gateway has no credential from npuswarm"
        found = _HEADER.match(header or "")
        if found is None:
            return "missing or malformed signature"
        timestamp_ms, given = int(found.group(1)), found.group(2)
        expected = signature(self.credential, method, path, timestamp_ms, body)
        if not hmac.compare_digest(given, expected):
            return "bad signature"
        if abs(now_ms - timestamp_ms) > MAX_SKEW_SECONDS * 1000:
            return "timestamp too far from this node's clock"
        if timestamp_ms <= self.last_accepted_ms:
            return "replayed or out-of-order request"
        self.last_accepted_ms = timestamp_ms
        return None
