"""The node agents of the synthetic Swarm (bench/enginesim.py --agent-port PORT).

What the operator reads on a real fleet is one `npuswarm agent` per NPU node, on the node's
address and the agent port, over TLS with the certificate the operator put in a Swarm secret,
answering signed ``GET /v1/state`` requests (nodehealth/agent.py). Here one listening socket
on that port stands in for all of them: every node's Status.Addr is a 127/8 address (Linux
routes all of 127.0.0.0/8 to loopback), and the destination address of each connection
(``getsockname()``) tells which node was asked.

A node answers only while a task of an agent service (a service labelled
``npuswarm.io/node-agent``) runs there, and only with what that task mounts: the TLS key and
certificate of the secret it mounts as the agent's TLS file, the credential of the one it
mounts as the credential file, both as the operator sent them to the sim. A new task is a new
agent (a new boot in its ETag, as a restarted container). A connection to a node without one
is closed at once (a real node refuses it: nothing listens there).

The answer is built and served by the real agent's code (nodehealth/agent.py): its handler
(signature check with the task's credential included, ETag and 304), its AgentState, its
``inspect`` of the container (here on a node where Ascend Docker Runtime delivered every device
and driver file, and set ``ASCEND_VISIBLE_DEVICES`` as asked), ``read_npu_smi`` running the
lab's stand-in npu-smi (hack/fake-npu-smi, with the NPU healths set through
``POST /sim/nodes/<node>/npus/<n>/health?state=Critical``) and ``read_roce`` (no hccn_tool). A
changed health is answered at once: the agent's own reading interval is not modelled.

Threads: one per open connection (the operator keeps one keep-alive connection per node), so
1,000 idle connections cost memory, not CPU. The CPU spent on handshakes and answers is
counted per thread (``time.thread_time``) and reported in /sim/stats under ``agents``.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import socketserver
import ssl
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from npuswarm.api import labels
from npuswarm.core.npus import parse_npu_ids
from npuswarm.gateway import protocol
from npuswarm.nodehealth import agent, agents, npusmi

if TYPE_CHECKING:
    from enginesim import EngineSim

FAKE_NPU_SMI = Path(__file__).resolve().parents[1] / "hack" / "fake-npu-smi"
HANDSHAKE_TIMEOUT_SECONDS = 10.0
# What a container that asked for NPUs sees under Ascend Docker Runtime, besides the
# ASCEND_VISIBLE_DEVICES it asked for.
RUNTIME_ENV = {"ASCEND_DOCKER_RUNTIME": "True"}


@dataclass
class NodeAgent:
    """One agent task: its node, TLS, state and handler."""

    task_id: str
    node_id: str
    context: ssl.SSLContext
    state: agent.AgentState
    handler: type[BaseHTTPRequestHandler]
    inputs: tuple[Any, ...] = ()
    since: dict[int, float] = field(default_factory=dict)  # NPU -> first read unhealthy


class AgentSim:
    def __init__(self, sim: EngineSim, port: int, host: str = "0.0.0.0") -> None:
        self.sim = sim
        self._dir = Path(tempfile.mkdtemp(prefix="agentsim-"))
        self._seen = -1  # the sim's generation the agents were last matched to
        self._health_seen = -1  # and its NPU health version
        self._by_addr: dict[str, NodeAgent] = {}
        self._by_task: dict[str, NodeAgent] = {}
        self._contexts: dict[str, ssl.SSLContext] = {}  # TLS secret id -> server context
        self._readings: dict[tuple[Any, ...], dict[str, str]] = {}  # npu-smi per NPU state
        self._stats_lock = threading.Lock()
        self.counters: Counter[str] = Counter()
        self.cpu_seconds = 0.0
        self._server = _Server((host, port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="agentsim", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> AgentSim:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def count(self, what: str, cpu: float = 0.0) -> None:
        with self._stats_lock:
            self.counters[what] += 1
            self.cpu_seconds += cpu

    def stats(self) -> dict[str, Any]:
        with self._stats_lock:
            counts = dict(self.counters)
            cpu = self.cpu_seconds
        with self.sim._lock:
            running = len(self._by_addr)
        return {"counts": counts, "cpu_seconds": round(cpu, 3), "running": running}

    # -- which agent answers at an address ----------------------------------------------------

    def agent_at(self, addr: str) -> NodeAgent | None:
        with self.sim._lock:
            if self.sim._generation != self._seen:
                self._match()
                self._seen = self.sim._generation
            return self._by_addr.get(addr)

    def _match(self) -> None:
        """Agents for the agent tasks running now on ready nodes (caller holds the sim's
        lock); an unchanged task keeps its agent and ETag."""
        sim = self.sim
        by_addr: dict[str, NodeAgent] = {}
        had_agent = {a.node_id for a in self._by_task.values()}
        health_changed = sim.npu_health_version != self._health_seen
        for service in sim.services.values():
            if labels.NODE_AGENT not in (service["Spec"].get("Labels") or {}):
                continue
            for task in sim._tasks_of(service["ID"]):
                node = sim.nodes.get(task.get("NodeID") or "")
                if (
                    node is None
                    or node["Status"]["State"] != "ready"
                    or task["DesiredState"] != "running"
                    or task["Status"]["State"] != "running"
                ):
                    continue
                found = self._by_task.get(task["ID"])
                if found is None:
                    found = self._start(task)
                    if found is None:
                        continue
                    if found.node_id in had_agent:
                        self.count("agents restarted")
                    self._refresh(found, task)
                elif health_changed:  # a task's spec never changes: only its NPUs' health
                    self._refresh(found, task)
                by_addr[node["Status"]["Addr"]] = found
        self._by_addr = by_addr
        self._by_task = {a.task_id: a for a in by_addr.values()}
        self._health_seen = sim.npu_health_version

    def _start(self, task: dict[str, Any]) -> NodeAgent | None:
        """The agent a new task runs, with what it mounts (None: its secrets are gone)."""
        mounted = {
            str((ref.get("File") or {}).get("Name")): str(ref.get("SecretID"))
            for ref in task["Spec"]["ContainerSpec"].get("Secrets") or []
        }
        tls_id, credential_id = mounted.get(agents.TLS_FILE), mounted.get(agents.CREDENTIAL_FILE)
        if tls_id not in self.sim.secrets or credential_id not in self.sim.secrets:
            self.count("task without its secrets")
            return None
        context = self._contexts.get(tls_id)
        if context is None:
            context = self._contexts[tls_id] = self._server_context(tls_id)
        credential = protocol.parse_credential(self.sim.secret_data(credential_id).decode())
        state = agent.AgentState()
        handler = _counted(agent.make_handler(state, protocol.Verifier(credential)), self)
        return NodeAgent(task["ID"], task["NodeID"], context, state, handler)

    def _server_context(self, secret_id: str) -> ssl.SSLContext:
        """The agent's TLS as it loads it from its mounted secret file."""
        path = self._dir / f"{secret_id}.pem"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(self.sim.secret_data(secret_id))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(path)
        return context

    def _refresh(self, found: NodeAgent, task: dict[str, Any]) -> None:
        """Its answer, built again only when what it reads changed."""
        container = task["Spec"]["ContainerSpec"]
        asked = _arg(container.get("Args") or [], "--npus")
        env = dict(item.split("=", 1) for item in container.get("Env") or [] if "=" in item)
        health = tuple(sorted(self.sim.npu_health.get(found.node_id, {}).items()))
        inputs = (asked, env.get("ASCEND_VISIBLE_DEVICES"), health)
        if inputs == found.inputs:
            return
        found.inputs = inputs
        seen_env = RUNTIME_ENV | {k: v for k, v in env.items() if k == "ASCEND_VISIBLE_DEVICES"}
        validation = agent.inspect(asked, exists=lambda _path: True) | {"env": seen_env}
        table = self._npu_smi(asked, dict(health))
        # A simulated agent reads npu-smi the moment an NPU's health changes (a real one on
        # its interval, NPUSWARM_NPU_HEALTH_SECONDS): its first unhealthy reading is the fault.
        found.since = {
            npu: self.sim.npu_fault_at.get((found.node_id, npu), at)
            for npu, at in npusmi.first_unhealthy(found.since, table["text"], time.time()).items()
        }
        document = {
            "validation": validation,
            "npuSmi": table,
            "npuSince": {str(npu): at for npu, at in found.since.items()},
            "roce": agent.read_roce(asked, str(self._dir / "no-hccn_tool")),
        }
        found.state.update(document)

    def _npu_smi(self, asked: str, health: Mapping[int, str]) -> dict[str, str]:
        """`npu-smi info` of NPUs ``asked`` with ``health``: the lab's stand-in run by the
        agent's own reader, once per distinct state."""
        key = (asked, tuple(sorted(health.items())))
        reading = self._readings.get(key)
        if reading is None:
            folder = self._dir / f"npu-smi-{len(self._readings)}"
            folder.mkdir()
            ids = sorted(parse_npu_ids(asked)) if asked else []
            (folder / "npus").write_text("".join(f"{n}\n" for n in ids))
            state = {"npus": {str(n): {"health": h} for n, h in health.items()}}
            (folder / "npu-smi-state.json").write_text(json.dumps(state))
            command = folder / "npu-smi"
            command.write_text(
                "#!/bin/sh\n"
                f"NPU_SMI_STATE='{folder / 'npu-smi-state.json'}' "
                f"exec '{sys.executable}' -S '{FAKE_NPU_SMI}' \"$@\"\n"
            )
            command.chmod(0o700)
            reading = self._readings[key] = agent.read_npu_smi(str(command))
        return reading


def _arg(args: list[str], name: str) -> str:
    for flag, value in itertools.pairwise(args):
        if flag == name:
            return str(value)
    return ""


def _counted(base: type[BaseHTTPRequestHandler], sim: AgentSim) -> type[BaseHTTPRequestHandler]:
    """The real handler, counting its answers and CPU, and closing the connection of an agent
    whose task is gone (the container it ran in is)."""

    class Handler(base):  # type: ignore[valid-type,misc]
        def handle_one_request(self) -> None:
            started = time.thread_time()
            try:
                super().handle_one_request()
            finally:
                sim.count("requests", time.thread_time() - started)

        def do_GET(self) -> None:  # noqa: N802 (BaseHTTPRequestHandler's name)
            current = sim.agent_at(self.connection.getsockname()[0])
            if current is None or current.handler is not type(self):
                sim.count("closed: agent gone")
                self.close_connection = True
                return
            if self.headers.get("If-None-Match"):
                sim.count("conditional reads")
            super().do_GET()

        def send_response(self, code: int, message: str | None = None) -> None:
            sim.count(f"answered {code}")
            super().send_response(code, message)

    return Handler


class _Server(ThreadingHTTPServer):
    """One socket for every node's agent; TLS per connection with that node's agent's key."""

    daemon_threads = True
    block_on_close = False
    # One socket stands in for a thousand: the operator connects to 32 nodes at once, and
    # socketserver's backlog of 5 would drop their SYNs (a 1 s retransmit each).
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], agents_: AgentSim) -> None:
        self.agents = agents_
        super().__init__(address, BaseHTTPRequestHandler)

    def server_bind(self) -> None:
        # HTTPServer's also looks the host up in DNS (getfqdn), which nothing here needs.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "agentsim", int(self.server_address[1])

    def finish_request(self, request: Any, client_address: Any) -> None:
        started = time.thread_time()
        assert isinstance(request, socket.socket)
        found = self.agents.agent_at(request.getsockname()[0])
        if found is None:
            self.agents.count("refused: no agent there", time.thread_time() - started)
            return  # process_request_thread closes it
        request.settimeout(HANDSHAKE_TIMEOUT_SECONDS)
        try:
            connection = found.context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            self.agents.count("handshake failed", time.thread_time() - started)
            return
        self.agents.count("connections", time.thread_time() - started)
        try:
            found.handler(connection, client_address, self)
        except OSError:
            pass  # the operator went away
        finally:
            connection.close()
