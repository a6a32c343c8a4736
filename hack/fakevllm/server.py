"""A stand-in for `vllm serve` on Ascend NPUs, for the lab and tests (stdlib only).

It speaks enough of vLLM's OpenAI-compatible API and metrics for npuswarm to be tested
without NPUs, and it checks the thing npuswarm is responsible for: that the task really got
the NPUs it needs (/dev/davinciN inside the container, put there by the Ascend Docker
Runtime from ASCEND_VISIBLE_DEVICES). Like the real server, it refuses to start without them.

Usage: vllm serve MODEL [--served-model-name NAME] [--tensor-parallel-size N] [--port P]
                        [--host H] [--enable-expert-parallel] [--max-model-len L]
                        [--max-num-seqs N] [--data-parallel-size D]
                        [--data-parallel-size-local L] [--data-parallel-address A]
                        [--data-parallel-rpc-port P] [--data-parallel-start-rank R]
                        [--headless] [...]
Unknown options are ignored, as in specs written for the real vllm-ascend image.

Load: at most --max-num-seqs requests run at once per data parallel rank (an "engine"); the
others wait in a FIFO queue, and /metrics shows both, with the KV-cache usage they cause.

Data parallel over several nodes (docs/swarm-lab.md, "Data parallel groups"): the server
without --headless is the leader: it serves the API and listens on A:P for its headless
members, and is ready only once they all joined. A headless member joins the leader at A:P
and serves no API. The group lives and dies together.

Environment that tests use to steer it:
  FAKE_VLLM_DEV_DIR              where to look for davinciN devices (default /dev)
  FAKE_VLLM_LOAD_SECONDS         simulated model load time before /health is 200 (default 0)
  FAKE_VLLM_CRASH_AFTER_SECONDS  exit with code 1 this long after start
  FAKE_VLLM_LATENCY_SECONDS      time each completion takes, so requests are seen running
  FAKE_VLLM_TOKEN_DELAY_SECONDS  time between two generated tokens (a stream's chunks arrive
                                 this far apart; default 0)
  FAKE_VLLM_DRAIN_SECONDS        on SIGTERM, stop accepting and let requests under way finish
                                 for at most this long, as vLLM's server does (default 30)
  FAKE_VLLM_MAX_RUNNING          overrides --max-num-seqs (default 256, vLLM's)
  FAKE_VLLM_KV_PER_REQUEST       the share of an engine's KV cache one running request takes
                                 (0 < x <= 1; default 1/max-num-seqs); an engine runs no more
                                 requests than fit
  FAKE_VLLM_HOLD                 1: running requests wait for POST /fake/release before their
                                 service time starts (tests make load appear and go on cue)
  FAKE_VLLM_DP_CONNECT_SECONDS   how long a headless member tries to reach its leader
                                 (default 300, vLLM's 5-minute handshake timeout)
"""

import argparse
import collections
import contextlib
import json
import os
import re
import select
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION = "0.9.2+fake"
CANNED_TEXT = "This is a canned answer from the fake vLLM server."
CONTROL_DEVICES = ("davinci_manager", "devmm_svm", "hisi_hdc")
# vLLM's own bucket bounds for vllm:e2e_request_latency_seconds (and the queue time's).
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)
# vLLM's bucket bounds for vllm:time_to_first_token_seconds.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0)
DEVICE_RE = re.compile(r"^davinci(\d+)$")
# vLLM's defaults: --max-num-seqs for the API server, the data parallel address and RPC port.
DEFAULT_MAX_NUM_SEQS = 256
DEFAULT_DP_ADDRESS = "127.0.0.1"
DEFAULT_DP_RPC_PORT = 29550
# A headless engine gives the front-end 5 minutes to answer (vLLM's HANDSHAKE_TIMEOUT_MINS).
DEFAULT_DP_CONNECT_SECONDS = 300.0
DP_CONNECT_RETRY_SECONDS = 0.5
DP_HELLO_SECONDS = 10.0
DP_MAX_LINE = 1 << 20
# How often a queued or held request looks whether its client is still there.
CLIENT_CHECK_SECONDS = 0.2
# What vllm-ascend's multi-node tutorials set on every node; logged, and sent to the leader.
GROUP_ENV = (
    "HCCL_IF_IP",
    "GLOO_SOCKET_IFNAME",
    "TP_SOCKET_IFNAME",
    "HCCL_SOCKET_IFNAME",
    "HCCL_BUFFSIZE",
    "OMP_PROC_BIND",
    "OMP_NUM_THREADS",
)


class StartupError(Exception):
    """The server cannot run on what it was given; the message says why."""


def log(msg: str) -> None:
    print(f"fake-vllm: {msg}", file=sys.stderr, flush=True)


def normalize_option(arg: str) -> str:
    """vLLM accepts --foo_bar as --foo-bar; so does the fake."""
    if not arg.startswith("--"):
        return arg
    name, sep, value = arg.partition("=")
    return name.replace("_", "-") + sep + value


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vllm", description="fake vLLM for npuswarm tests")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("model")
    serve.add_argument("--served-model-name", nargs="+")
    serve.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--enable-expert-parallel", action="store_true")
    serve.add_argument("--max-model-len", type=int)
    serve.add_argument("--max-num-seqs", type=int, default=DEFAULT_MAX_NUM_SEQS)
    serve.add_argument("--data-parallel-size", "-dp", type=int, default=1)
    serve.add_argument("--data-parallel-size-local", "-dpl", type=int)
    serve.add_argument("--data-parallel-address", "-dpa")
    serve.add_argument("--data-parallel-rpc-port", "-dpp", type=int)
    serve.add_argument("--data-parallel-start-rank", "-dpr", type=int, default=0)
    serve.add_argument("--headless", action="store_true")
    args, ignored = parser.parse_known_args([normalize_option(a) for a in argv])
    args.ignored = ignored
    args.argv = list(argv)
    return args


def find_devices(dev_dir: str) -> list[int]:
    try:
        names = os.listdir(dev_dir)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for m in map(DEVICE_RE.match, names) if m)


def parse_id_list(text: str) -> list[int]:
    """ASCEND_*_VISIBLE_DEVICES forms: `0`, `1,3`, `0-2,4`."""
    ids: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, _, high = part.partition("-")
        ids.extend(range(int(low), int(high or low) + 1))
    return ids


def check_npus(devices: list[int], needed: int, what: str, dev_dir: str, env) -> None:
    """Fail like vllm-ascend does when the NPUs it was promised are not there: ``needed``
    NPUs for ``what`` (the options that ask for them)."""
    if not devices:
        raise StartupError(
            f"no Ascend NPU found: no davinciN device in {dev_dir}; the container must be started "
            "by the Ascend Docker Runtime with ASCEND_VISIBLE_DEVICES set "
            f"(ASCEND_VISIBLE_DEVICES={env.get('ASCEND_VISIBLE_DEVICES', '<unset>')})"
        )
    usable = len(devices)
    rt_visible = env.get("ASCEND_RT_VISIBLE_DEVICES")
    if rt_visible:
        try:
            ordinals = parse_id_list(rt_visible)
        except ValueError:
            raise StartupError(f"cannot parse ASCEND_RT_VISIBLE_DEVICES={rt_visible!r}") from None
        bad = [i for i in ordinals if i >= len(devices)]
        if bad:
            raise StartupError(
                f"invalid device ordinal {bad[0]} in ASCEND_RT_VISIBLE_DEVICES={rt_visible}: "
                f"the container sees {len(devices)} NPU(s), numbered 0..{len(devices) - 1}, "
                "not by their host ids"
            )
        usable = len(ordinals)
    if usable < needed:
        names = ",".join(f"davinci{d}" for d in devices)
        raise StartupError(
            f"{what} needs {needed} NPUs but only {usable} usable: {names} in {dev_dir}"
            + (f" (ASCEND_RT_VISIBLE_DEVICES={rt_visible})" if rt_visible else "")
        )


# --- data parallel layout and the environment of a group ----------------------------------


@dataclass(frozen=True)
class Layout:
    """This server's place in its data parallel group (a group of one without DP options)."""

    size: int  # --data-parallel-size: ranks in the whole group
    local: int  # --data-parallel-size-local: ranks this server runs
    start: int  # --data-parallel-start-rank: this server's first rank
    tensor_parallel: int
    address: str  # --data-parallel-address: where the leader listens for its members
    port: int  # --data-parallel-rpc-port
    headless: bool

    @property
    def ranks(self) -> list[int]:
        return list(range(self.start, self.start + self.local))

    @property
    def npus(self) -> int:
        return self.local * self.tensor_parallel

    def npus_wanted_by(self) -> str:
        tp = f"--tensor-parallel-size {self.tensor_parallel}"
        return tp if self.local == 1 else f"--data-parallel-size-local {self.local} x {tp}"

    def describe(self) -> dict:
        return {
            "data_parallel_size": self.size,
            "data_parallel_size_local": self.local,
            "data_parallel_start_rank": self.start,
            "data_parallel_address": self.address,
            "data_parallel_rpc_port": self.port,
            "headless": self.headless,
            "tensor_parallel_size": self.tensor_parallel,
            "ranks": self.ranks,
        }


def span(ranks: list[int]) -> str:
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"


def check_layout(args: argparse.Namespace) -> Layout:
    """The data parallel options, refused where vLLM refuses them or where the group could
    never form (a multi-node group here runs as many ranks on every node)."""
    size, tp, start = (
        args.data_parallel_size,
        args.tensor_parallel_size,
        args.data_parallel_start_rank,
    )
    local = size if args.data_parallel_size_local is None else args.data_parallel_size_local
    port = (
        DEFAULT_DP_RPC_PORT if args.data_parallel_rpc_port is None else args.data_parallel_rpc_port
    )
    if tp < 1:
        raise StartupError(f"--tensor-parallel-size {tp} must be at least 1")
    if size < 1:
        raise StartupError(f"--data-parallel-size {size} must be at least 1")
    if local < 1:
        raise StartupError(
            "data_parallel_size_local must be > 0 in headless mode"
            if args.headless
            else f"--data-parallel-size-local {local}: an API server without engines of its "
            "own is not supported by the fake"
        )
    if local > size:
        raise StartupError(
            f"--data-parallel-size-local {local} is larger than --data-parallel-size {size}"
        )
    if size % local:
        raise StartupError(
            f"--data-parallel-size {size} is not a multiple of --data-parallel-size-local "
            f"{local}: every node of a data parallel group runs as many ranks"
        )
    if not args.headless and start != 0:
        raise StartupError(
            f"--data-parallel-start-rank {start} is only for --headless members: the server "
            f"that serves the API runs ranks 0..{local - 1}"
        )
    if args.headless and start == 0:
        raise StartupError(
            "a --headless member needs --data-parallel-start-rank > 0: rank 0 runs with the "
            "API server (the group's leader)"
        )
    if start < 0 or start + local > size:
        raise StartupError(
            f"--data-parallel-start-rank {start} with --data-parallel-size-local {local} gives "
            f"ranks {span(list(range(start, start + local)))}, outside --data-parallel-size {size} "
            f"(ranks 0..{size - 1})"
        )
    if not 0 < port < 65536:
        raise StartupError(f"--data-parallel-rpc-port {port} is not a port")
    return Layout(
        size=size,
        local=local,
        start=start,
        tensor_parallel=tp,
        address=args.data_parallel_address or DEFAULT_DP_ADDRESS,
        port=port,
        headless=args.headless,
    )


def hccl_ifname_matches(value: str, names: set[str]) -> bool:
    """HCCL_SOCKET_IFNAME: `eth,enp` prefixes, `=eth0` exact names, `^...` exclusions."""
    if value.startswith("^"):
        return True
    exact = value.startswith("=")
    wanted = [w for w in value.lstrip("=").split(",") if w]
    return any(n == w if exact else n.startswith(w) for n in names for w in wanted)


def check_group_env(env) -> dict[str, str]:
    """The tutorials' communication settings, checked as HCCL and gloo would use them: the
    interfaces must exist here and HCCL_IF_IP must be an address of this host. Returns the
    ones set."""
    found = {key: env[key] for key in GROUP_ENV if env.get(key)}
    names = {name for _, name in socket.if_nameindex()}
    listing = ", ".join(sorted(names))
    for key in ("GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME"):
        missing = [n for n in found.get(key, "").split(",") if n and n not in names]
        if missing:
            raise StartupError(
                f"{key}={found[key]}: no network interface {missing[0]} here "
                f"(interfaces: {listing})"
            )
    hccl = found.get("HCCL_SOCKET_IFNAME")
    if hccl and not hccl_ifname_matches(hccl, names):
        raise StartupError(
            f"HCCL_SOCKET_IFNAME={hccl} matches no network interface here (interfaces: {listing})"
        )
    address = found.get("HCCL_IF_IP")
    if address:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            with socket.socket(family) as probe:
                probe.bind((address, 0))
        except OSError as exc:
            raise StartupError(
                f"HCCL_IF_IP={address} is not an address of this host: {exc.strerror or exc}"
            ) from None
    return found


def send_line(sock: socket.socket, message: dict) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


def keep_alive(sock: socket.socket) -> None:
    """Notice a peer whose host vanished (no FIN, no RST) within about 11 seconds."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def describe_server(args, layout: Layout, env, devices: list[int], group_env: dict) -> dict:
    """What a member tells its leader about itself (the leader describes itself the same way)."""
    return {
        "ranks": layout.ranks,
        "start_rank": layout.start,
        "local_size": layout.local,
        "size": layout.size,
        "tensor_parallel_size": layout.tensor_parallel,
        "model": args.model,
        "address": group_env.get("HCCL_IF_IP"),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "devices": [f"davinci{d}" for d in devices],
        "ASCEND_VISIBLE_DEVICES": env.get("ASCEND_VISIBLE_DEVICES"),
        "ASCEND_RT_VISIBLE_DEVICES": env.get("ASCEND_RT_VISIBLE_DEVICES"),
        "env": group_env,
        "args": args.argv,
    }


class Group:
    """The leader's side of its data parallel group: it listens on the rendezvous port until
    every headless member has joined (said hello, then ready), refuses a member whose ranks
    or configuration do not fit, and exits as soon as a member it accepted is lost."""

    def __init__(self, layout: Layout, leader: dict) -> None:
        self.layout = layout
        # The leader is reached at the group's address unless HCCL_IF_IP says otherwise.
        address = leader["address"] or layout.address
        self.leader = {**leader, "address": address, "role": "leader", "peer": None}
        self.lock = threading.Lock()
        self.members: list[dict] = []
        self.connections: list[socket.socket] = []
        self.listener: socket.socket | None = None
        self.stopping = False

    def expected(self) -> set[int]:
        return set(range(self.layout.local, self.layout.size))

    def _joined(self, state: str | None = None) -> set[int]:
        return {
            rank
            for member in self.members
            if state is None or member["state"] == state
            for rank in member["ranks"]
        }

    def missing(self) -> list[int]:
        with self.lock:
            return sorted(self.expected() - self._joined("ready"))

    def complete(self) -> bool:
        return not self.missing()

    def listen(self) -> None:
        if not self.expected():
            return  # every rank runs here
        where = f"{self.layout.address}:{self.layout.port}"
        try:
            self.listener = socket.create_server((self.layout.address, self.layout.port))
        except OSError as exc:
            raise StartupError(
                f"cannot listen for the data parallel group on {where} "
                f"(--data-parallel-address, --data-parallel-rpc-port): {exc.strerror or exc}"
            ) from None
        log(
            f"data parallel leader: waiting on {where} for ranks "
            f"{span(sorted(self.expected()))} of {self.layout.size}"
        )
        threading.Thread(target=self.accept, args=(self.listener,), daemon=True).start()

    def close_listener(self) -> None:
        """vLLM's front-end closes its handshake socket once the engines are up: a member
        that comes later finds nobody to join."""
        with self.lock:
            listener, self.listener = self.listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() under way
            listener.close()

    def accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, peer = listener.accept()
            except OSError:
                return  # closed: the group is complete, or stopping
            threading.Thread(target=self.serve_member, args=(conn, peer), daemon=True).start()

    def refusal(self, hello: dict) -> str | None:
        """Why the member that sent ``hello`` cannot join, or None. Called with the lock."""
        who = f"the member on {hello.get('hostname')} ({hello.get('address')})"
        layout = self.layout
        for key, option, mine in (
            ("size", "--data-parallel-size", layout.size),
            ("tensor_parallel_size", "--tensor-parallel-size", layout.tensor_parallel),
            ("model", "model", self.leader["model"]),
        ):
            if hello.get(key) != mine:
                return f"{who} runs with {option} {hello.get(key)}, the leader with {mine}"
        open_ranks = sorted(self.expected() - self._joined())
        for rank in hello["ranks"]:
            if rank not in open_ranks:
                return (
                    f"Message from engine with unexpected data parallel rank: {rank} ({who}, "
                    f"--data-parallel-start-rank {hello['start_rank']} "
                    f"--data-parallel-size-local {hello['local_size']}; the leader runs "
                    f"{span(layout.ranks)} and waits for "
                    f"{','.join(map(str, open_ranks)) or 'no more ranks'})"
                )
        return None

    def serve_member(self, conn: socket.socket, peer: tuple) -> None:
        reader = conn.makefile("rb")
        try:
            conn.settimeout(DP_HELLO_SECONDS)
            hello = json.loads(reader.readline(DP_MAX_LINE) or b"null")["hello"]
            start, local = int(hello["start_rank"]), int(hello["local_size"])
            hello["ranks"] = list(range(start, start + local))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log(f"ignoring a connection from {peer[0]} to the data parallel port: no hello ({exc})")
            conn.close()
            return
        member = {**hello, "role": "member", "peer": peer[0], "state": "joined"}
        with self.lock:
            problem = self.refusal(hello)
            if problem is None:
                self.members.append(member)
                self.connections.append(conn)
        if problem:
            with contextlib.suppress(OSError):
                send_line(conn, {"refused": problem})
            log(f"error: {problem}")
            os._exit(1)  # vLLM's front-end fails its start on an unexpected engine
        ranks = span(member["ranks"])
        where = f"{member['hostname']} at {member['address']}"
        try:
            conn.settimeout(None)
            keep_alive(conn)
            send_line(conn, {"welcome": self.layout.describe()})
            log(f"data parallel rank {ranks} joined from {where}")
            for line in reader:
                if json.loads(line).get("ready"):
                    self.member_ready(member, ranks, where)
        except (OSError, ValueError):
            pass
        with self.lock:
            if self.stopping:
                return
        log(f"error: data parallel rank {ranks} lost ({where}): the group cannot go on")
        os._exit(1)

    def member_ready(self, member: dict, ranks: str, where: str) -> None:
        with self.lock:
            complete = self.expected() <= self._joined("ready") | set(member["ranks"])
        if complete:
            # Closed before the group reports complete: once the leader answers 200, no
            # latecomer can join (and be refused).
            self.close_listener()
        with self.lock:
            member["state"] = "ready"
        log(f"data parallel rank {ranks} on {where} ready")
        if complete:
            log(f"data parallel group complete: ranks 0..{self.layout.size - 1}")

    def stop(self, reason: str) -> None:
        """Close the rendezvous: every member is told, and exits."""
        with self.lock:
            self.stopping = True
            connections = list(self.connections)
        self.close_listener()
        for conn in connections:
            with contextlib.suppress(OSError):
                send_line(conn, {"stop": reason})
                conn.shutdown(socket.SHUT_RDWR)

    def describe(self, leader_state: str) -> dict:
        with self.lock:
            members = [{**self.leader, "state": leader_state}] + [dict(m) for m in self.members]
        return {
            **{k: v for k, v in self.layout.describe().items() if k not in ("ranks", "headless")},
            "complete": self.complete(),
            "missing_ranks": self.missing(),
            "members": members,
        }


# --- a headless member ---------------------------------------------------------------------


def join_leader(layout: Layout, env, hello: dict) -> tuple[socket.socket, object]:
    """Connect to the leader (retrying while it is not up yet), say hello, get the welcome."""
    where = f"{layout.address}:{layout.port}"
    seconds = float(env.get("FAKE_VLLM_DP_CONNECT_SECONDS") or DEFAULT_DP_CONNECT_SECONDS)
    deadline = time.monotonic() + seconds
    source = (hello["address"], 0) if hello["address"] else None
    told = False
    while True:
        try:
            sock = socket.create_connection(
                (layout.address, layout.port), timeout=5, source_address=source
            )
            break
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise StartupError(
                    f"no data parallel leader answered at {where} within {seconds:g}s "
                    f"(FAKE_VLLM_DP_CONNECT_SECONDS): {exc.strerror or exc}"
                ) from None
            if not told:
                log(f"no data parallel leader at {where} yet ({exc.strerror or exc}): retrying")
                told = True
            time.sleep(DP_CONNECT_RETRY_SECONDS)  # the leader may not be up yet: try again
    hello = {**hello, "address": hello["address"] or sock.getsockname()[0]}
    reader = sock.makefile("rb")
    try:
        send_line(sock, {"hello": hello})
        sock.settimeout(max(DP_HELLO_SECONDS, deadline - time.monotonic()))
        reply = json.loads(reader.readline(DP_MAX_LINE) or b"null")
    except (OSError, ValueError):
        reply = None
    if not isinstance(reply, dict) or not ("welcome" in reply or "refused" in reply):
        raise StartupError(f"the data parallel leader at {where} did not answer the hello")
    if "refused" in reply:
        raise StartupError(f"the data parallel leader at {where} refused: {reply['refused']}")
    sock.settimeout(None)
    keep_alive(sock)
    return sock, reader


def watch_leader(reader, where: str) -> None:
    """A member lives as long as its leader: exit non-zero as soon as it goes."""
    reason = "the connection closed"
    try:
        for line in reader:
            message = json.loads(line)
            if "stop" in message:
                reason = f"it stopped the group ({message['stop']})"
                break
    except (OSError, ValueError) as exc:
        reason = str(exc)
    log(f"error: data parallel leader at {where} lost: {reason}; the group cannot go on")
    os._exit(1)


def run_member(args, layout: Layout, env, devices: list[int], group_env: dict) -> None:
    """A headless member: no API; it joins the leader, "loads", says ready, and stays in the
    group until it is stopped or the leader goes."""
    where = f"{layout.address}:{layout.port}"

    def stop(*_) -> None:
        log("stopping (SIGTERM): leaving the data parallel group")
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    arm_crash_timer(env)
    log(
        f"headless: data parallel rank(s) {span(layout.ranks)} of {layout.size} for {args.model}, "
        f"tensor parallel {layout.tensor_parallel}, NPUs {[f'davinci{d}' for d in devices]}; "
        f"joining the leader at {where}; no API server"
        + (f", ignoring {' '.join(args.ignored)}" if args.ignored else "")
    )
    sock, reader = join_leader(layout, env, describe_server(args, layout, env, devices, group_env))
    log(f"joined the data parallel leader at {where}")
    threading.Thread(target=watch_leader, args=(reader, where), daemon=True).start()
    time.sleep(float(env.get("FAKE_VLLM_LOAD_SECONDS") or 0))  # simulated model load
    with contextlib.suppress(OSError):  # a leader gone meanwhile: watch_leader reports it
        send_line(sock, {"ready": True})
    log("ready")
    threading.Event().wait()


# --- load: vLLM's scheduler, reduced to what shows in its metrics -------------------------


class Ticket:
    """One request's way through an engine's queue."""

    def __init__(self, number: int, engine: int) -> None:
        self.number = number  # arrival order on this server, from 0
        self.engine = engine
        self.arrived = time.time()
        self.started = self.arrived
        self.start_number = -1

    def describe(self) -> dict:
        return {
            "engine": self.engine,
            "arrival": self.number,
            "start": self.start_number,
            "queued_seconds": round(self.started - self.arrived, 6),
        }


class EngineQueue:
    def __init__(self) -> None:
        self.waiting: collections.deque[Ticket] = collections.deque()
        self.running = 0


class Scheduler:
    """Per engine (data parallel rank) at most ``capacity`` requests run at once; the others
    wait in arrival order (vLLM's FCFS policy). A request is given to the engine with the
    least load, as vLLM's data parallel front-end does (4 x waiting + running). A request
    whose client goes away while it waits or is held is dropped, as vLLM aborts it."""

    def __init__(self, engines: int, capacity: int, hold: bool) -> None:
        self.cond = threading.Condition()
        self.engines = [EngineQueue() for _ in range(engines)]
        self.capacity = capacity
        self.holding = hold
        self.permits = 0
        self.held: collections.deque[Ticket] = collections.deque()
        self.arrivals = 0
        self.starts = 0

    def submit(self) -> Ticket:
        with self.cond:
            loads = [4 * len(e.waiting) + e.running for e in self.engines]
            ticket = Ticket(self.arrivals, loads.index(min(loads)))
            self.arrivals += 1
            self.engines[ticket.engine].waiting.append(ticket)
            return ticket

    def start(self, ticket: Ticket, gone) -> bool:
        """Wait for the ticket's turn; False if its client went away first."""
        engine = self.engines[ticket.engine]
        with self.cond:
            while engine.waiting[0] is not ticket or engine.running >= self.capacity:
                if gone():
                    engine.waiting.remove(ticket)
                    self.cond.notify_all()
                    return False
                self.cond.wait(CLIENT_CHECK_SECONDS)
            engine.waiting.popleft()
            engine.running += 1
            ticket.started = time.time()
            ticket.start_number = self.starts
            self.starts += 1
            if self.holding:
                self.held.append(ticket)  # held in the order they started
            self.cond.notify_all()  # the next in line may fit as well
            return True

    def hold(self, ticket: Ticket, gone) -> bool:
        """A request that started while the gate was closed waits for a permit (oldest
        first) or for the gate to open; False if its client went away first."""
        with self.cond:
            while ticket in self.held:
                if self.held[0] is ticket and self.permits > 0:
                    self.permits -= 1
                    self.held.popleft()
                elif gone():
                    self.held.remove(ticket)
                    self.cond.notify_all()
                    return False
                else:
                    self.cond.wait(CLIENT_CHECK_SECONDS)
            self.cond.notify_all()
            return True

    def finish(self, ticket: Ticket) -> None:
        with self.cond:
            self.engines[ticket.engine].running -= 1
            self.cond.notify_all()

    def gate(self, holding: bool | None = None, permits: int = 0) -> dict:
        """Close (True) or open (False) the gate, or let ``permits`` held requests go."""
        with self.cond:
            if holding is not None:
                self.holding = holding
                self.permits = 0
                if not holding:
                    self.held.clear()
            self.permits += permits
            self.cond.notify_all()
            return {"holding": self.holding, "held": len(self.held), "permits": self.permits}

    def loads(self) -> list[tuple[int, int]]:
        """(running, waiting) of every engine."""
        with self.cond:
            return [(e.running, len(e.waiting)) for e in self.engines]


def client_gone(sock: socket.socket) -> bool:
    """True once the client closed its side (it sends nothing more after its request)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    try:
        events = poller.poll(0)
        if not events:
            return False
        if events[0][1] & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
            return True
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class Histogram:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.sum += seconds
        self.count += 1
        for i, bound in enumerate(self.bounds):
            if seconds <= bound:
                self.counts[i] += 1

    def lines(self, name: str, label: str) -> list[str]:
        return histogram_lines(name, self.bounds, self.counts, self.count, self.sum, label)


class EngineStats:
    """One engine's counters and histograms, under vLLM's metric names."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.success = 0
        self.latency = Histogram(LATENCY_BUCKETS)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.queue_time = Histogram(LATENCY_BUCKETS)

    def first_token(self, seconds: float) -> None:
        with self.lock:
            self.ttft.observe(seconds)

    def started(self, queued_seconds: float) -> None:
        with self.lock:
            self.queue_time.observe(queued_seconds)

    def finish(self, prompt_tokens: int, generation_tokens: int, seconds: float) -> None:
        with self.lock:
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += generation_tokens
            self.success += 1
            self.latency.observe(seconds)


def histogram_lines(
    name: str,
    bounds: tuple[float, ...],
    counts: list[int],
    count: int,
    total: float,
    label: str,
) -> list[str]:
    """A histogram's samples in Prometheus' text format, as vLLM exposes them."""
    lines = [
        f'{name}_bucket{{le="{bound}",{label}}} {n}'
        for bound, n in zip(bounds, counts, strict=False)
    ]
    return lines + [
        f'{name}_bucket{{le="+Inf",{label}}} {count}',
        f"{name}_count{{{label}}} {count}",
        f"{name}_sum{{{label}}} {total}",
    ]


# (name, type, help) of every family, in the order they are written.
METRIC_FAMILIES = (
    ("vllm:num_requests_running", "gauge", "Number of requests in model execution batches."),
    ("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed."),
    ("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage."),
    (
        "vllm:gpu_cache_usage_perc",
        "gauge",
        "GPU KV-cache usage. 1 means 100 percent usage (vLLM 0.9's name of "
        "vllm:kv_cache_usage_perc).",
    ),
    ("vllm:num_preemptions_total", "counter", "Cumulative number of preemption from the engine."),
    ("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed."),
    ("vllm:generation_tokens_total", "counter", "Number of generation tokens processed."),
    ("vllm:request_success_total", "counter", "Count of successfully processed requests."),
    (
        "vllm:e2e_request_latency_seconds",
        "histogram",
        "Histogram of end to end request latency in seconds.",
    ),
    (
        "vllm:time_to_first_token_seconds",
        "histogram",
        "Histogram of time to first token in seconds.",
    ),
    (
        "vllm:request_queue_time_seconds",
        "histogram",
        "Histogram of time spent in WAITING phase for request.",
    ),
)


def engine_samples(
    stats: EngineStats, running: int, waiting: int, kv_per_request: float, label: str
) -> dict[str, list[str]]:
    """One engine's sample lines, by family."""
    usage = round(min(1.0, running * kv_per_request), 6)
    with stats.lock:
        return {
            "vllm:num_requests_running": [f"vllm:num_requests_running{{{label}}} {running}"],
            "vllm:num_requests_waiting": [f"vllm:num_requests_waiting{{{label}}} {waiting}"],
            "vllm:kv_cache_usage_perc": [f"vllm:kv_cache_usage_perc{{{label}}} {usage}"],
            "vllm:gpu_cache_usage_perc": [f"vllm:gpu_cache_usage_perc{{{label}}} {usage}"],
            "vllm:num_preemptions_total": [f"vllm:num_preemptions_total{{{label}}} 0"],
            "vllm:prompt_tokens_total": [
                f"vllm:prompt_tokens_total{{{label}}} {stats.prompt_tokens}"
            ],
            "vllm:generation_tokens_total": [
                f"vllm:generation_tokens_total{{{label}}} {stats.generation_tokens}"
            ],
            "vllm:request_success_total": [
                f'vllm:request_success_total{{finished_reason="stop",{label}}} {stats.success}'
            ],
            "vllm:e2e_request_latency_seconds": stats.latency.lines(
                "vllm:e2e_request_latency_seconds", label
            ),
            "vllm:time_to_first_token_seconds": stats.ttft.lines(
                "vllm:time_to_first_token_seconds", label
            ),
            "vllm:request_queue_time_seconds": stats.queue_time.lines(
                "vllm:request_queue_time_seconds", label
            ),
        }


def render_metrics(
    model_name: str, stats: list[EngineStats], loads: list[tuple[int, int]], kv_per_request: float
) -> str:
    """vLLM V1's metrics: one series per engine (data parallel rank), labelled with the
    served model name and the engine's index."""
    model = model_name.replace("\\", "\\\\").replace('"', '\\"')
    engines = [
        engine_samples(s, running, waiting, kv_per_request, f'model_name="{model}",engine="{i}"')
        for i, (s, (running, waiting)) in enumerate(zip(stats, loads, strict=True))
    ]
    lines: list[str] = []
    for name, kind, text in METRIC_FAMILIES:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        for samples in engines:
            lines += samples[name]
    return "\n".join(lines) + "\n"


def check_load(args: argparse.Namespace, env) -> tuple[int, float]:
    """(max running requests per engine, the KV-cache share of one running request)."""
    raw = env.get("FAKE_VLLM_MAX_RUNNING")
    source = "FAKE_VLLM_MAX_RUNNING" if raw else "--max-num-seqs"
    try:
        max_running = int(raw) if raw else args.max_num_seqs
    except ValueError:
        raise StartupError(f"FAKE_VLLM_MAX_RUNNING={raw!r} is not an integer") from None
    if max_running < 1:
        raise StartupError(f"{source} {max_running} must be at least 1")
    raw = env.get("FAKE_VLLM_KV_PER_REQUEST")
    try:
        kv = float(raw) if raw else 1 / max_running
    except ValueError:
        kv = -1.0
    if not 0 < kv <= 1:
        raise StartupError(f"FAKE_VLLM_KV_PER_REQUEST={raw!r} must be a number in (0, 1]")
    return max_running, kv


class FakeVllm:
    """State shared by the request handlers of one server (a group's leader, or alone)."""

    def __init__(
        self,
        args: argparse.Namespace,
        env,
        devices: list[int],
        dev_dir: str,
        layout: Layout,
        group_env: dict[str, str],
    ) -> None:
        self.model = args.model
        self.served_name = (args.served_model_name or [args.model])[0]
        self.served_names = args.served_model_name or [args.model]
        self.args = args
        self.env = env
        self.devices = devices
        self.dev_dir = dev_dir
        self.layout = layout
        self.started = time.time()
        self.ready_at = self.started + float(env.get("FAKE_VLLM_LOAD_SECONDS") or 0)
        self.latency = float(env.get("FAKE_VLLM_LATENCY_SECONDS") or 0)
        self.token_delay = float(env.get("FAKE_VLLM_TOKEN_DELAY_SECONDS") or 0)
        self.drain_seconds = float(env.get("FAKE_VLLM_DRAIN_SECONDS") or 30)
        self.max_running, self.kv_per_request = check_load(args, env)
        # An engine runs no more requests than its KV cache holds.
        capacity = min(self.max_running, int(1 / self.kv_per_request + 1e-9))
        hold = (env.get("FAKE_VLLM_HOLD") or "").lower() in ("1", "true", "yes")
        # Every rank of the group is an engine the leader's API hands requests to.
        self.scheduler = Scheduler(layout.size, capacity, hold)
        self.stats = [EngineStats() for _ in range(layout.size)]
        self.group = Group(layout, describe_server(args, layout, env, devices, group_env))
        # Connections being served (the server speaks HTTP/1.0: one request each).
        self.connections = 0
        self.idle = threading.Condition()

    def serving(self, delta: int) -> None:
        with self.idle:
            self.connections += delta
            self.idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """True once no connection is being served, False if ``timeout`` passed first."""
        with self.idle:
            return self.idle.wait_for(lambda: self.connections == 0, timeout=timeout)

    def loaded(self) -> bool:
        return time.time() >= self.ready_at

    def ready(self) -> bool:
        return self.loaded() and self.group.complete()

    def not_ready_reason(self) -> str:
        if not self.loaded():
            return "model is still loading"
        return (
            f"waiting for data parallel rank(s) {','.join(map(str, self.group.missing()))} "
            f"of {self.layout.size} to join"
        )

    def metrics(self) -> str:
        loads = self.scheduler.loads()
        return render_metrics(self.served_name, self.stats, loads, self.kv_per_request)

    def group_info(self) -> dict:
        return self.group.describe("ready" if self.loaded() else "loading")

    def npus(self) -> dict:
        return {
            "hostname": socket.gethostname(),
            "devices": [f"davinci{d}" for d in self.devices],
            "control_devices": [
                n for n in CONTROL_DEVICES if os.path.exists(os.path.join(self.dev_dir, n))
            ],
            "ASCEND_VISIBLE_DEVICES": self.env.get("ASCEND_VISIBLE_DEVICES"),
            "ASCEND_RT_VISIBLE_DEVICES": self.env.get("ASCEND_RT_VISIBLE_DEVICES"),
            "ASCEND_DOCKER_RUNTIME": self.env.get("ASCEND_DOCKER_RUNTIME"),
            "DOCKER_RESOURCE_NPU": self.env.get("DOCKER_RESOURCE_NPU"),
            "tensor_parallel_size": self.args.tensor_parallel_size,
            "enable_expert_parallel": self.args.enable_expert_parallel,
            "max_num_seqs": self.max_running,
            "data_parallel": self.layout.describe(),
            "served_model_name": self.served_name,
            "model": self.model,
            "pid": os.getpid(),
        }

    def npus_header(self) -> str:
        info = self.npus()
        keys = ("hostname", "devices", "ASCEND_VISIBLE_DEVICES", "ASCEND_RT_VISIBLE_DEVICES")
        return json.dumps({k: info[k] for k in keys}, separators=(",", ":"))

    def models(self) -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": int(self.started),
                    "owned_by": "vllm",
                    "root": self.model,
                    "parent": None,
                    "max_model_len": self.args.max_model_len,
                }
                for name in self.served_names
            ],
        }


def count_tokens(value) -> int:
    if isinstance(value, list):
        return sum(count_tokens(v) for v in value)
    if isinstance(value, dict):
        return count_tokens(value.get("content", ""))
    return len(str(value).split())


def canned_tokens(max_tokens) -> list[str]:
    words = CANNED_TEXT.split()
    if isinstance(max_tokens, int) and max_tokens > 0:
        words = words[:max_tokens]
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


class Handler(BaseHTTPRequestHandler):
    server_version = "fake-vllm/" + VERSION
    app: FakeVllm  # set on the subclass made by make_handler

    def log_message(self, format, *args):
        pass  # tests poll often; an access log line per poll would drown the useful output

    def handle(self):
        self.app.serving(+1)
        try:
            super().handle()
        finally:
            self.app.serving(-1)

    # --- plumbing -------------------------------------------------------------------------
    def send_json(self, status: int, body, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Fake-Vllm-Npus", self.app.npus_header())
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def send_error_json(self, status: int, message: str, kind: str) -> None:
        self.send_json(
            status,
            {"object": "error", "message": message, "type": kind, "param": None, "code": status},
        )

    def read_json(self):
        length = int(self.headers.get("Content-Length") or 0)
        try:
            return json.loads(self.rfile.read(length) or b"{}")
        except json.JSONDecodeError as exc:
            self.send_error_json(400, f"invalid JSON body: {exc}", "BadRequestError")
            return None

    def not_ready(self) -> bool:
        if self.app.ready():
            return False
        self.send_error_json(503, self.app.not_ready_reason(), "ServiceUnavailableError")
        return True

    # --- routes ---------------------------------------------------------------------------
    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/health":
            if not self.not_ready():
                self.send_json(200, {})
        elif path == "/npus":
            self.send_json(200, self.app.npus())
        elif path == "/version":
            self.send_json(200, {"version": VERSION})
        elif path == "/metrics":
            self.send_metrics()
        elif path == "/v1/models":
            if not self.not_ready():
                self.send_json(200, self.app.models())
        elif path == "/fake/group":
            self.send_json(200, self.app.group_info())
        else:
            self.send_error_json(404, f"no route {path}", "NotFoundError")

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        if path == "/fake/crash":
            self.crash()
        elif path == "/fake/hold":
            self.send_json(200, self.app.scheduler.gate(holding=True))
        elif path == "/fake/release":
            self.release()
        elif path in ("/v1/completions", "/v1/chat/completions"):
            if not self.not_ready():
                self.complete(chat=path.endswith("chat/completions"))
        else:
            self.send_error_json(404, f"no route {path}", "NotFoundError")

    def send_metrics(self) -> None:
        data = self.app.metrics().encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Fake-Vllm-Npus", self.app.npus_header())
        self.end_headers()
        self.wfile.write(data)

    def release(self) -> None:
        """Let held requests go: ``count`` of them (oldest first), or all and open the gate."""
        body = self.read_json()
        if body is None:
            return
        count = body.get("count")
        if count is None:
            self.send_json(200, self.app.scheduler.gate(holding=False))
        elif isinstance(count, int) and count >= 0:
            self.send_json(200, self.app.scheduler.gate(permits=count))
        else:
            self.send_error_json(
                400, f"count must be an integer >= 0, not {count!r}", "BadRequestError"
            )

    def crash(self) -> None:
        body = self.read_json()
        code = int((body or {}).get("exit_code", 1))
        self.send_json(200, {"crashing": True, "exit_code": code})
        self.wfile.flush()
        log(f"crashing on request (POST /fake/crash), exit code {code}")
        os._exit(code)

    def complete(self, chat: bool) -> None:
        request = self.read_json()
        if request is None:
            return
        model = request.get("model", self.app.served_name)
        if model not in self.app.served_names:
            self.send_error_json(404, f"The model `{model}` does not exist.", "NotFoundError")
            return
        prompt_tokens = count_tokens(request.get("messages" if chat else "prompt", ""))
        tokens = canned_tokens(request.get("max_tokens"))
        scheduler = self.app.scheduler
        ticket = scheduler.submit()

        def gone() -> bool:
            return client_gone(self.connection)

        if not scheduler.start(ticket, gone):
            self.close_connection = True
            return  # the client gave up while its request waited: vLLM aborts it
        stats = self.app.stats[ticket.engine]
        stats.started(ticket.started - ticket.arrived)
        served = False
        try:
            if not scheduler.hold(ticket, gone):
                self.close_connection = True
                return  # the client gave up while its request was held
            served = True
            if self.app.latency:
                time.sleep(self.app.latency)  # simulated inference time, not synchronisation
            headers = {"X-Fake-Vllm-Request": json.dumps(ticket.describe(), separators=(",", ":"))}
            if request.get("stream"):
                self.stream(chat, model, tokens, ticket.arrived, stats, headers)
            else:
                stats.first_token(time.time() - ticket.arrived)
                # simulated decoding time, not synchronisation
                time.sleep(self.app.token_delay * max(0, len(tokens) - 1))
                body = self.completion_body(chat, model, tokens, prompt_tokens)
                self.send_json(200, body, headers)
        finally:
            if served:  # counted before the request leaves the running gauge
                stats.finish(prompt_tokens, len(tokens), time.time() - ticket.arrived)
            scheduler.finish(ticket)

    def completion_body(
        self, chat: bool, model: str, tokens: list[str], prompt_tokens: int
    ) -> dict:
        text = "".join(tokens)
        choice = {"index": 0, "finish_reason": "stop", "logprobs": None}
        choice.update(
            {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        )
        return {
            "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(tokens),
                "total_tokens": prompt_tokens + len(tokens),
            },
        }

    def stream(
        self,
        chat: bool,
        model: str,
        tokens: list[str],
        began: float,
        stats: EngineStats,
        headers: dict,
    ) -> None:
        """Server-sent events as vLLM sends them: one chunk per token, each written and
        flushed as it is made (FAKE_VLLM_TOKEN_DELAY_SECONDS apart), then [DONE]."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.send_header("X-Fake-Vllm-Npus", self.app.npus_header())
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        for i, token in enumerate(tokens):
            if i == 0:
                stats.first_token(time.time() - began)
            elif self.app.token_delay:
                time.sleep(self.app.token_delay)  # simulated decoding time per token
            last = i == len(tokens) - 1
            choice = {"index": 0, "finish_reason": "stop" if last else None, "logprobs": None}
            choice.update(
                {"delta": {"role": "assistant", "content": token}} if chat else {"text": token}
            )
            chunk = {
                "id": ident,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()),
                "model": model,
                "choices": [choice],
            }
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        self.close_connection = True


def make_handler(app: FakeVllm) -> type[Handler]:
    return type("BoundHandler", (Handler,), {"app": app})


def arm_crash_timer(env) -> None:
    seconds = env.get("FAKE_VLLM_CRASH_AFTER_SECONDS")
    if not seconds:
        return

    def crash() -> None:
        log(f"crashing as asked by FAKE_VLLM_CRASH_AFTER_SECONDS={seconds}")
        os._exit(1)

    timer = threading.Timer(float(seconds), crash)
    timer.daemon = True
    timer.start()


def drain_and_exit(server: ThreadingHTTPServer, app: FakeVllm) -> None:
    """Stop accepting, let the connections under way finish, exit 0. serve_forever must be
    stopped from another thread than the one running it (the signal arrives on that one)."""

    def drain() -> None:
        server.shutdown()
        server.server_close()  # new connections are refused from now on
        finished = app.wait_idle(app.drain_seconds)
        log(
            "stopping"
            + ("" if finished else f": requests still running after {app.drain_seconds}s")
        )
        app.group.stop("the leader was stopped")
        os._exit(0)

    threading.Thread(target=drain, daemon=True).start()


def serve(args: argparse.Namespace, env) -> None:
    dev_dir = env.get("FAKE_VLLM_DEV_DIR") or "/dev"
    devices = find_devices(dev_dir)
    layout = check_layout(args)
    check_npus(devices, layout.npus, layout.npus_wanted_by(), dev_dir, env)
    group_env = check_group_env(env)
    if group_env:
        log("communication settings: " + " ".join(f"{k}={v}" for k, v in group_env.items()))
    if layout.headless:
        run_member(args, layout, env, devices, group_env)
    app = FakeVllm(args, env, devices, dev_dir, layout, group_env)
    app.group.listen()
    server = ThreadingHTTPServer((args.host, args.port), make_handler(app))
    server.daemon_threads = True
    # As PID 1 in a container, SIGTERM is ignored unless handled: handle it so that
    # `docker service rm` and updates do not wait for the kill timeout, and, like vLLM's
    # server, let requests under way finish first (a rolling update must fail none).
    signal.signal(signal.SIGTERM, lambda *_: drain_and_exit(server, app))
    arm_crash_timer(env)
    parallel = (
        f", data parallel ranks {span(layout.ranks)} of {layout.size}" if layout.size > 1 else ""
    )
    log(
        f"serving {app.served_name} (model {app.model}) on {args.host}:{args.port}, "
        f"tensor parallel {args.tensor_parallel_size}{parallel}, NPUs {app.npus()['devices']}, "
        f"at most {app.max_running} requests running per engine"
        + (f", ignoring {' '.join(args.ignored)}" if args.ignored else "")
    )
    server.serve_forever()
    threading.Event().wait()  # the drain thread ends the process


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        serve(args, os.environ)
    except StartupError as exc:
        log(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
