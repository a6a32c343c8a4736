"""`npuswarm agent`: the node agent, one long-lived task per NPU node (docs/node-health.md).

It runs from the operator's image in a container that asks for the node's NPUs
(``ASCEND_VISIBLE_DEVICES``), so what it finds is what the runtime gives a replica. On its
interval it looks for the devices and driver files the runtime must deliver (the checks of
nodehealth/checks.py) and reads `npu-smi info` by absolute path. It answers one signed request
(gateway/protocol.py) over TLS with its certificate from npuswarm's CA: a tenant process on the
node cannot answer in its place, and only the operator can ask. The answer carries an ETag; a
request with ``If-None-Match`` of the current one gets 304 and no body, so reading an
unchanged fleet costs a header per node.

It also serves its node's NPUs under Huawei npu-exporter's metric names (``GET /metrics``,
unsigned, as npu-exporter serves them): Prometheus scrapes each node's agent, so the
operator's own scrape does not grow with the NPUs of the fleet (docs/monitoring.md).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from npuswarm import metrics
from npuswarm.core.npus import parse_npu_ids
from npuswarm.gateway import protocol
from npuswarm.nodehealth import agents, checks, npusmi, pathcheck, roce
from npuswarm.nodehealth.npusmi import NpuReading

NPU_SMI = "/usr/local/bin/npu-smi"
NPU_SMI_TIMEOUT_SECONDS = 20.0
# An idle keep-alive connection is closed after this long (the operator reads every 30 s).
IDLE_SECONDS = 120.0
# A request naming host paths to check: at most this large (core/hostfiles.MAX_PATHS_PER_NODE
# paths of at most 4 KiB each).
MAX_BODY = 256 * 1024


def inspect(visible: str, exists: Callable[[str], bool] = os.path.exists) -> dict[str, Any]:
    """What the runtime gave this container that asked for ``visible`` (ids): the paths it
    lacks and its ``ASCEND_*`` env as seen (nodehealth/checks.py judges them)."""
    try:
        npus = parse_npu_ids(visible)
    except ValueError:
        npus = frozenset()
    missing = [path for path in checks.check_paths(npus) if not exists(path)]
    env = {k: v for k, v in os.environ.items() if k.startswith("ASCEND_")}
    return {"missing": missing, "env": env, "npus": visible}


def read_npu_smi(
    command: str = NPU_SMI, timeout: float = NPU_SMI_TIMEOUT_SECONDS
) -> dict[str, str]:
    """`npu-smi info` as printed, or why it could not run."""
    try:
        done = subprocess.run(
            [command, "info"], capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as failed:
        return {"text": "", "error": str(failed)}
    why = "" if done.returncode == 0 else f"exit {done.returncode}: {done.stderr.strip()[:300]}"
    return {"text": done.stdout, "error": why}


class AgentState:
    """The last readings and their ETag: the boot (a restarted agent never repeats an ETag)
    and a version that grows when what it says changes."""

    def __init__(self) -> None:
        self.boot = uuid.uuid4().hex[:12]
        self.version = 0
        self.body = b"{}"
        self.document: dict[str, Any] = {}
        self.lock = threading.Lock()

    @property
    def etag(self) -> str:
        return f'"{self.boot}-{self.version}"'

    def update(self, document: dict[str, Any]) -> bool:
        body = json.dumps(document, sort_keys=True).encode()
        with self.lock:
            self.document = document
            if body == self.body:
                return False
            self.body, self.version = body, self.version + 1
            return True

    def answer(self) -> tuple[str, bytes]:
        with self.lock:
            return self.etag, self.body

    def exporter_readings(self, node: str) -> list[tuple[str, NpuReading, roce.RoceLink | None]]:
        """The last reading per NPU, for the npu-exporter metrics: read as the operator reads
        the answer (error codes with the default grades: only the codes are served)."""
        with self.lock:
            document = self.document
        links = roce.links(document) or {}
        readings = agents.npu_readings(document)
        return [(node, reading, links.get(npu)) for npu, reading in sorted(readings.items())]


def exporter(state: AgentState, node: str) -> CollectorRegistry:
    """The registry ``GET /metrics`` serves: this node's NPUs under npu-exporter's names."""
    registry = CollectorRegistry(auto_describe=False)
    collector = metrics.NpuExporterCollector()
    collector.source = lambda: state.exporter_readings(node)
    registry.register(collector)
    return registry


def read_faults(table: str, command: str = NPU_SMI) -> dict[str, str]:
    """`npu-smi info -t health -i N -c 0` of each NPU whose Health column is not OK: its
    error codes, graded by the operator (nodehealth/faults.py). Healthy NPUs cost nothing."""
    found: dict[str, str] = {}
    for npu, reading in sorted(npusmi.parse_npu_smi(table).items()):
        if reading.health != "OK":
            found[str(npu)] = _run([command, "info", "-t", "health", "-i", str(npu), "-c", "0"])
    return found


def read_roce(visible: str, hccn_tool: str = roce.HCCN_TOOL) -> dict[str, Any]:
    """Each NPU's RoCE link and net health as hccn_tool prints them (parsed by the operator,
    nodehealth/roce.py); ``present`` False where the node has no hccn_tool."""
    if not os.path.exists(hccn_tool):
        return {"present": False}
    try:
        npus = sorted(parse_npu_ids(visible))
    except ValueError:
        npus = []
    found: dict[str, dict[str, str]] = {}
    for npu in npus:
        found[str(npu)] = {
            "link": _run([hccn_tool, "-i", str(npu), "-link", "-g"]),
            "net": _run([hccn_tool, "-i", str(npu), "-net_health", "-g"]),
        }
    return {"present": True, "npus": found}


def _run(command: list[str]) -> str:
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=NPU_SMI_TIMEOUT_SECONDS, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as failed:
        return f"error: {failed}"
    return done.stdout[:2000]


class Reader:
    """What the agent reads on each interval; RoCE (hccn_tool: two calls per NPU) only every
    ``roce_every``-th time."""

    def __init__(
        self, visible: str, npu_smi: str, hccn_tool: str = roce.HCCN_TOOL, roce_every: int = 4
    ) -> None:
        self.visible, self.npu_smi, self.hccn_tool = visible, npu_smi, hccn_tool
        self.roce_every = max(1, roce_every)
        self.count = 0
        self.roce: dict[str, Any] = {"present": False}
        self.since: dict[int, float] = {}  # NPU -> first read unhealthy (epoch seconds)

    def refresh(self, state: AgentState) -> dict[str, Any]:
        """Read again; returns the validation part (what the container has)."""
        validation = inspect(self.visible)
        if self.count % self.roce_every == 0:
            self.roce = read_roce(self.visible, self.hccn_tool)
        self.count += 1
        table = read_npu_smi(self.npu_smi)
        self.since = npusmi.first_unhealthy(self.since, table["text"], time.time())
        state.update(
            {
                "validation": validation,
                "npuSmi": table,
                "npuSince": {str(npu): at for npu, at in self.since.items()},
                "npuFaults": read_faults(table["text"], self.npu_smi),
                "roce": self.roce,
            }
        )
        return validation


def lacking(validation: dict[str, Any]) -> bool:
    """The container lacks what the runtime should have given it. Its devices and mounts
    were fixed when it was created, so only a new container sees a fixed node."""
    return (
        bool(validation["missing"])
        or validation["env"].get("ASCEND_VISIBLE_DEVICES") != validation["npus"]
    )


def make_handler(
    state: AgentState,
    verifier: protocol.Verifier,
    clock: Callable[[], float] = time.time,
    paths: pathcheck.PathChecker | None = None,
    scraped: CollectorRegistry | None = None,
) -> type[BaseHTTPRequestHandler]:
    verify_lock = threading.Lock()
    paths_lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: one TLS handshake per operator connection
        timeout = IDLE_SECONDS

        def do_GET(self) -> None:
            if self.path == agents.METRICS_PATH and scraped is not None:
                self._send(200, generate_latest(scraped), content_type=CONTENT_TYPE_LATEST)
                return
            self._answer("GET", b"")

        def do_POST(self) -> None:
            """The state, and what this node has at the host paths the body names
            (``{"paths": [...]}``, signed with the request)."""
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self.close_connection = True
                self._send(413, b'{"error": "request too large"}')
                return
            self._answer("POST", self.rfile.read(length))

        def _answer(self, method: str, request: bytes) -> None:
            with verify_lock:
                refusal = verifier.refusal(
                    self.headers.get("Authorization"),
                    method,
                    self.path,
                    request,
                    int(clock() * 1000),
                )
            if refusal is not None:
                self._send(401, json.dumps({"error": refusal}).encode())
                return
            if self.path != agents.STATE_PATH:
                self._send(404, b'{"error": "not found"}')
                return
            etag, body = state.answer()
            if method == "POST":
                etag, body = self._with_paths(etag, body, request)
            if self.headers.get("If-None-Match") == etag:
                self._send(304, b"", etag)
                return
            self._send(200, body, etag)

        def _with_paths(self, etag: str, body: bytes, request: bytes) -> tuple[str, bytes]:
            try:
                asked = json.loads(request).get("paths") or []
            except (ValueError, AttributeError):
                asked = []
            asked = [p for p in asked if isinstance(p, str) and len(p) <= 4096][:64]
            if paths is None:
                found = {p: {"exists": False, "error": "no host roots given"} for p in asked}
            else:
                with paths_lock:
                    found = paths.answer(asked)
            part = json.dumps(found, sort_keys=True).encode()
            digest = hashlib.sha256(part).hexdigest()[:16]
            merged = json.dumps({**json.loads(body), "paths": found}, sort_keys=True).encode()
            return f'{etag[:-1]}-{digest}"', merged

        def _send(
            self, code: int, body: bytes, etag: str = "", content_type: str = "application/json"
        ) -> None:
            self.send_response(code)
            if etag:
                self.send_header("ETag", etag)
            if code != 304:
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body:
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per read would flood the node's logs

    return Handler


def serve(
    port: int,
    credential: bytes,
    tls_pem: str,
    visible: str,
    interval: float,
    npu_smi: str = NPU_SMI,
    host: str = "",
    stop: threading.Event | None = None,
    recheck_failed: float = 0.0,
    hccn_tool: str = roce.HCCN_TOOL,
    host_roots: tuple[str, ...] = (),
    host_view: str = agents.HOST_VIEW,
    node: str = "",
) -> ThreadingHTTPServer:
    """Start reading and serving (in threads); returns the server (``shutdown()`` ends it).
    With ``recheck_failed``, a container that lacks what the runtime should give sets
    ``stop`` that long after its start, so that Swarm starts a new one: a node fixed meanwhile
    is then seen, with nothing else restarted."""
    stop = stop or threading.Event()
    state = AgentState()
    reader = Reader(visible, npu_smi, hccn_tool)
    started = time.monotonic()
    failed = lacking(reader.refresh(state))  # validation before the first answer

    def keep_reading() -> None:
        while not stop.wait(min(interval, recheck_failed or interval)):
            if failed and recheck_failed and time.monotonic() - started >= recheck_failed:
                print("npuswarm agent: validation failed; exiting for a new container", flush=True)
                stop.set()
                return
            try:
                reader.refresh(state)
            except Exception as error:  # the agent keeps serving its last reading
                print(f"npuswarm agent: reading failed: {error}", flush=True)

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls_pem)
    paths = pathcheck.PathChecker(host_roots, pathcheck.HostView(host_view), interval)
    handler = make_handler(
        state, protocol.Verifier(credential), paths=paths, scraped=exporter(state, node)
    )
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=keep_reading, name="agent-readings", daemon=True).start()
    threading.Thread(target=server.serve_forever, name="agent-server", daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="npuswarm agent", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=9109)
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between readings")
    parser.add_argument("--secrets-dir", default=protocol.SECRETS_DIR)
    parser.add_argument("--npu-smi", default=NPU_SMI)
    parser.add_argument(
        "--npus",
        default="",
        help="the NPU ids the service asked for (default: ASCEND_VISIBLE_DEVICES as seen)",
    )
    parser.add_argument(
        "--host-roots",
        default="",
        help="the allowed host-path roots (comma-separated) whose paths the operator may ask about",
    )
    parser.add_argument(
        "--host-view",
        default=agents.HOST_VIEW,
        help="where the node's filesystem is mounted read-only in this container",
    )
    parser.add_argument(
        "--node",
        default=os.environ.get(agents.NODE_ENV, ""),
        help="the node's name in the metrics' node label (the service sets it from Swarm)",
    )
    parser.add_argument(
        "--recheck-failed",
        type=float,
        default=60.0,
        help="seconds after which an agent whose container failed validation exits (0: never)",
    )


def run(args: argparse.Namespace) -> int:
    directory = args.secrets_dir
    with open(os.path.join(directory, agents.CREDENTIAL_FILE), encoding="ascii") as file:
        credential = protocol.parse_credential(file.read())
    visible = args.npus or os.environ.get("ASCEND_VISIBLE_DEVICES", "")
    stop = threading.Event()
    server = serve(
        args.port,
        credential,
        os.path.join(directory, agents.TLS_FILE),
        visible,
        args.interval,
        args.npu_smi,
        stop=stop,
        recheck_failed=args.recheck_failed,
        host_roots=tuple(r for r in args.host_roots.split(",") if r),
        host_view=args.host_view,
        node=args.node or socket.gethostname(),
    )
    print(f"npuswarm agent: serving on :{args.port}, NPUs {visible or 'none'}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    server.shutdown()
    # Non-zero: Swarm's restart policy starts a new container either way; the exit says why.
    return 3 if stop.is_set() else 0
