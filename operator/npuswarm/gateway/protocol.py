"""The signed channel from npuswarm to what it runs on the nodes: a ModelGateway replica's admin
port (the push of its backends) and a node agent's port (its readings, nodehealth/agent.py).
How a request is signed and checked, and the client side: a signer whose timestamps only grow
and an HTTPS connection that checks the peer's certificate against the name npuswarm issued it
for (docs/security.md, "The push channel" and "The node agent channel").

Standard library only: the gateway front, which runs in the gateway image, imports this and
nothing else of npuswarm.

Every request carries ``Authorization: NPUSWARM-HMAC-SHA256 ts=<ms>,sig=<hex>``, an
HMAC-SHA256 with the gateway's own credential over the method, the path, the timestamp and
the SHA-256 of the body. The credential never travels: a reader of the network path (who
also faces TLS) learns nothing that opens this or any other gateway. A replica accepts only
timestamps later than the last it accepted and within ``MAX_SKEW_SECONDS`` of its clock, so a
recorded push replayed later, or two pushes reordered, change nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable

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
        raise ValueError("a credential has at least 32 bytes")
    return value


class Signer:
    """Signs requests with timestamps that only grow within this process, even for two
    requests in one millisecond (a peer refuses a timestamp it has seen)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._last = 0
        self._lock = threading.Lock()

    def now_ms(self) -> int:
        with self._lock:
            self._last = max(self._last + 1, int(self._clock() * 1000))
            return self._last

    def headers(self, credential: bytes, method: str, path: str, body: bytes) -> dict[str, str]:
        stamp = self.now_ms()
        return {
            "Content-Type": "application/json",
            "Authorization": authorization(credential, method, path, stamp, body),
        }


class PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a node's address that checks the certificate against the name npuswarm issued
    it for, not the address (a gateway's or the node agents' certificate names them, not the
    node they run on)."""

    def __init__(
        self, address: str, port: int, server_name: str, context: ssl.SSLContext, timeout: float
    ) -> None:
        super().__init__(address, port, timeout=timeout, context=context)
        self._server_name = server_name
        self._tls = context

    def connect(self) -> None:
        self.sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._tls.wrap_socket(self.sock, server_hostname=self._server_name)


class Verifier:
    """One peer's check of signed requests (a gateway replica, a node agent). Not
    thread-safe: the caller serialises it."""

    def __init__(self, credential: bytes | None) -> None:
        self.credential = credential
        self.last_accepted_ms = 0

    def refusal(
        self, header: str | None, method: str, path: str, body: bytes, now_ms: int
    ) -> str | None:
        """None when the request is authentic and fresh (and it is then the newest accepted),
        else why it is refused. Refusals say little: the caller is not trusted."""
        if self.credential is None:
            return "no credential from npuswarm"
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
