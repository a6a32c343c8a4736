"""A fault-injecting proxy in front of the Docker Engine API (issue 12, outages), or, healthy
or stopped only, in front of any TCP service (the kube-apiserver: tests/e2e/test_ha.py).

127.0.0.1:<port> -> a Docker unix socket, or host:port. Healthy, it copies bytes both ways (keep-alive
connections stay open, streams such as /events flow). With faults set, it reads each request,
rewrites it to `Connection: close` so every request arrives on a connection of its own, and
then, by a seeded draw per request:

- `error`: answers 500 with Docker's error body, never forwarding the request;
- `reset`: closes the connection without an answer (a dropped connection);
- `lost`: forwards the request and drops the answer, so the write happened but the client
  cannot know (the case that must not lead to a second service for one replica);
- `slow`: waits `delay` seconds before forwarding (longer than the client's timeout: a
  timeout);
- otherwise forwards after `jitter` seconds.

`stop()` refuses every connection (Docker gone) until `start()`. Counters say how many faults
of each kind were injected, for the figures in docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass

from localrun import free_port

ERROR_BODY = b'{"message":"injected fault: the Docker API answered 500"}'
HEAD_LIMIT = 64 * 1024


@dataclass(frozen=True)
class Faults:
    error: float = 0.0
    reset: float = 0.0
    lost: float = 0.0
    slow: float = 0.0
    delay: float = 0.0  # seconds a `slow` request waits before it is forwarded
    jitter: float = 0.0  # seconds every other request waits
    seed: int = 12

    def draw(self, rng: random.Random) -> str:
        roll = rng.random()
        for kind in ("error", "reset", "lost", "slow"):
            share = getattr(self, kind)
            if roll < share:
                return kind
            roll -= share
        return "forward"


class FaultProxy:
    def __init__(self, target: str = "/var/run/docker.sock") -> None:
        self.target = target
        self.port = free_port()
        self.url = f"tcp://127.0.0.1:{self.port}"
        self.injected: Counter[str] = Counter()
        self._faults: Faults | None = None
        self._rng = random.Random(0)
        self._listener: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()

    # -- switches ---------------------------------------------------------------------------

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        """Refuse new connections and cut open ones: to the client, Docker is gone."""
        with self._lock:
            if self._listener is not None:
                # close() alone does not wake a thread blocked in accept(); shutdown() does.
                with contextlib.suppress(OSError):
                    self._listener.shutdown(socket.SHUT_RDWR)
                self._listener.close()
                self._listener = None
        self._cut_all()

    def set_faults(self, faults: Faults | None) -> None:
        """From now on (None: healthy again). Open connections are cut, so that keep-alive
        connections made before cannot slip past the faults."""
        with self._lock:
            self._faults = faults
            self._rng = random.Random(faults.seed if faults else 0)
        self._cut_all()

    # -- plumbing ---------------------------------------------------------------------------

    def _cut_all(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            _close(conn)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                self._connections.append(client)
                faults = self._faults
            handler = self._pipe_connection if faults is None else self._one_request
            threading.Thread(target=handler, args=(client,), daemon=True).start()

    def _upstream(self) -> socket.socket | None:
        # A unix socket's path, or host:port (a TCP service such as the kube-apiserver: the
        # bytes are copied as they are, so TLS passes through).
        host, colon, port = self.target.rpartition(":")
        tcp = bool(colon) and port.isdigit() and not self.target.startswith("/")
        upstream = socket.socket(socket.AF_INET if tcp else socket.AF_UNIX)
        try:
            upstream.connect((host, int(port)) if tcp else self.target)
        except OSError:
            upstream.close()
            return None
        with self._lock:
            self._connections.append(upstream)
        return upstream

    def _pipe_connection(self, client: socket.socket) -> None:
        upstream = self._upstream()
        if upstream is None:
            _close(client)
            return
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=_pipe, args=(a, b), daemon=True).start()

    def _one_request(self, client: socket.socket) -> None:
        try:
            request = _read_request(client)
        except OSError:
            request = None
        if request is None:
            _close(client)
            return
        with self._lock:
            faults = self._faults
            kind = faults.draw(self._rng) if faults else "forward"
            if kind != "forward":
                self.injected[kind] += 1
        if faults is None:
            kind = "forward"
        if kind == "error":
            with contextlib.suppress(OSError):
                client.sendall(
                    b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(ERROR_BODY)}\r\nConnection: close\r\n\r\n".encode()
                    + ERROR_BODY
                )
            _close(client)
            return
        if kind == "reset":
            _reset(client)
            return
        wait = (faults.delay if kind == "slow" else faults.jitter) if faults else 0.0
        if wait:
            time.sleep(wait)
        upstream = self._upstream()
        if upstream is None:
            _close(client)
            return
        try:
            upstream.sendall(request)
        except OSError:
            _close(upstream)
            _close(client)
            return
        if kind == "lost":
            # Let dockerd act on the request, then drop its answer.
            try:
                upstream.settimeout(30)
                upstream.recv(1)
            except OSError:
                pass
            _close(upstream)
            _reset(client)
            return
        _pipe(upstream, client)


def _read_request(client: socket.socket) -> bytes | None:
    """One request, rewritten to `Connection: close`; None when the client sent nothing."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = client.recv(65536)
        if not chunk:
            return None
        data += chunk
        if len(data) > HEAD_LIMIT:
            return None
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    kept = [lines[0]]
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        lowered = name.strip().lower()
        if lowered == b"connection":
            continue
        if lowered == b"content-length":
            length = int(value.strip())
        kept.append(line)
    kept.append(b"Connection: close")
    while len(body) < length:
        chunk = client.recv(65536)
        if not chunk:
            return None
        body += chunk
    return b"\r\n".join(kept) + b"\r\n\r\n" + body


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        _close(source)
        _close(sink)


def _close(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)
    conn.close()


def _reset(conn: socket.socket) -> None:
    """Close with RST, as a dropped connection looks to the client."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    conn.close()
