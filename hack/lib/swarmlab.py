"""A multi-node, Ascend-like Docker Swarm on one machine, for npuswarm's tests.

Each node is one dockerd (with its own managed containerd) in its own network namespace,
mount namespace and UTS namespace; node 1 is the Swarm manager, the others are workers.
Every node advertises fake NPUs as Swarm generic resources, carries the node labels of an
Atlas 800I A2, runs tasks through hack/ascend-runtime-shim (a stand-in for the Ascend Docker
Runtime) and has the fake vLLM image imported, since there is no registry.

Isolation, so that the lab clashes with nothing else on the machine:
- names: namespaces `npsl-<lab>-<k>` and `npsl-<lab>-br`, sockets and state under
  /run/npuswarm-lab/<lab>/ and /var/lib/npuswarm-lab/<lab>/, a root-namespace veth `npsl-<lab>`
  and a private /24 whose third octet derives from the lab name;
- network: the bridge lives in its own namespace; the root namespace reaches the nodes through
  one veth with forwarding off; node namespaces have no default route, so nothing leaves;
- processes: everything started goes into the cgroup npuswarm-lab/<lab> (containers too, via
  dockerd's cgroup-parent), and `down` kills exactly the PIDs listed there.
  The root namespace's default dockerd (/var/run/docker.sock) is never contacted.

Use from tests:  with swarmlab.lab_session(nodes=3) as lab: docker.DockerClient(lab.endpoint)
Use by hand:     hack/swarm-lab up | status | down   (see docs/swarm-lab.md)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

# The lab cannot be brought up, used or torn down: the message says what to do.
from localrun import ToolError as LabError
from localrun import wait_for

HACK = Path(__file__).resolve().parents[1]
SHIM = HACK / "ascend-runtime-shim"
BUILD_IMAGE = HACK / "build-fakevllm-image"
IMAGE = "npuswarm/fake-vllm:dev"
IMAGE_KEY_LABEL = "npuswarm.io/fake-vllm-key"
IMAGE_CHANGES = [
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    # Like vllm-ascend's image: no entrypoint; a spec names `vllm` itself (see the seed stack).
    'CMD ["vllm", "--help"]',
]

RUN_ROOT = Path("/run/npuswarm-lab")
STATE_ROOT = Path("/var/lib/npuswarm-lab")
CGROUP_FS = Path("/sys/fs/cgroup")
CGROUP_BASE = "npuswarm-lab"
DEFAULT_NAME = "npsl"
NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,9}$")  # `npsl-<name>` must fit IFNAMSIZ (15 chars)
SUBNET_PREFIX = "10.123"
ROOT_HOST = 254  # the root namespace's address in the lab subnet
OVERLAY_POOL = "10.210.0.0/16"  # Swarm's overlays, inside node namespaces only
STATE_TMPFS_SIZE = "8g"  # an upper bound; tmpfs takes memory only for what is stored
DISPATCHER_HEARTBEAT_NS = 1_000_000_000  # 1s: a lost node shows Down in ~3s, not 11-15s
DAEMON_ENV_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

NPU_MODEL_LABELS = {
    "npuswarm.io/npu-model": "910B4",
    "npuswarm.io/npu-memory-gib": "32",
    "npuswarm.io/topology": "any",
}
RINGS_NODE_LABELS = {
    "npuswarm.io/npu-model": "910A",
    "npuswarm.io/npu-memory-gib": "32",
    "npuswarm.io/topology": "rings-of-4",
}
CONTROL_DEVICES = ("davinci_manager", "devmm_svm", "hisi_hdc")
FAKE_NPU_SMI = HACK / "fake-npu-smi"
FAKE_HCCN_TOOL = HACK / "fake-hccn-tool"
ROCE_STATE = "hccn-tool-state.json"  # in the node's driver/dcmi, read by the stand-in hccn_tool

# With --tls the manager also listens on tcp://<its address>:TLS_PORT and demands a client
# certificate signed by the lab's CA, as a production manager reached over the network does.
TLS_PORT = 2376
TLS_DAYS = "7"

DAEMON_START_TIMEOUT = 60.0
SWARM_READY_TIMEOUT = 60.0
KILL_TIMEOUT = 15.0


# ---------------------------------------------------------------------------------------
# small utilities


def log(msg: str) -> None:
    print(f"swarm-lab: {msg}", file=sys.stderr, flush=True)


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise LabError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def docker_client(url: str, timeout: int = 30):
    import docker  # imported late: `swarm-lab down` must work without the SDK

    return docker.DockerClient(base_url=url, version="auto", timeout=timeout)


# ---------------------------------------------------------------------------------------
# configuration: every name and path of a lab derives from its name


def default_octet(name: str) -> int:
    """Third octet of the lab subnet: 0 for the default lab, else derived from the name so
    that two labs with different names can coexist."""
    if name == DEFAULT_NAME:
        return 0
    return 1 + zlib.crc32(name.encode()) % 250


@dataclass(frozen=True)
class Node:
    """One lab node as seen from the root namespace."""

    lab: str
    index: int
    address: str
    run_dir: Path
    state_dir: Path

    @property
    def netns(self) -> str:
        return f"npsl-{self.lab}-{self.index}"

    @property
    def hostname(self) -> str:
        return f"{self.lab}-node{self.index}"

    @property
    def socket(self) -> Path:
        return self.run_dir / "docker.sock"

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    @property
    def bridge_port(self) -> str:
        return f"n{self.index}"

    @property
    def dev_dir(self) -> Path:
        return self.state_dir / "dev"

    @property
    def driver_dir(self) -> Path:
        """The shim mounts lib64, dcmi and npu-smi from here, as the real runtime mounts the
        driver's files."""
        return self.state_dir / "driver"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "dockerd.pid"

    @property
    def cgroup(self) -> str:
        return f"{CGROUP_BASE}/{self.lab}/node{self.index}"

    @property
    def daemon_cgroup(self) -> str:
        return f"{self.cgroup}/daemons"

    @property
    def etc_dir(self) -> Path:
        return Path("/etc/netns") / self.netns

    @property
    def is_manager(self) -> bool:
        return self.index == 1


@dataclass(frozen=True)
class LabConfig:
    name: str = DEFAULT_NAME
    nodes: int = 3
    npus: int = 8
    rings_node: bool = False
    octet: int = -1  # -1: derive from the name
    tls: bool = False  # the manager also listens on TCP with --tlsverify

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise LabError(f"lab name {self.name!r} must match {NAME_RE.pattern}")
        if self.octet == -1:
            object.__setattr__(self, "octet", default_octet(self.name))
        if not 0 <= self.octet <= 255:
            raise LabError(f"subnet octet {self.octet} is not in 0..255")
        if not 1 <= self.nodes <= 50:
            raise LabError(f"--nodes {self.nodes} is not in 1..50")
        if not 1 <= self.npus <= 16:
            raise LabError(f"--npus {self.npus} is not in 1..16")

    @property
    def run_dir(self) -> Path:
        return RUN_ROOT / self.name

    @property
    def state_dir(self) -> Path:
        return STATE_ROOT / self.name

    @property
    def subnet(self) -> str:
        return f"{SUBNET_PREFIX}.{self.octet}.0/24"

    @property
    def root_address(self) -> str:
        return f"{SUBNET_PREFIX}.{self.octet}.{ROOT_HOST}"

    @property
    def root_veth(self) -> str:
        return f"npsl-{self.name}"

    @property
    def bridge_netns(self) -> str:
        return f"npsl-{self.name}-br"

    @property
    def cgroup(self) -> str:
        return f"{CGROUP_BASE}/{self.name}"

    @property
    def config_file(self) -> Path:
        return self.state_dir / "lab.json"

    @property
    def tls_dir(self) -> Path:
        """The CA and server files; ``client/`` is a DOCKER_CERT_PATH (ca, cert, key .pem)."""
        return self.state_dir / "tls"

    def node(self, index: int) -> Node:
        return Node(
            self.name,
            index,
            f"{SUBNET_PREFIX}.{self.octet}.{index}",
            self.run_dir / f"node{index}",
            self.state_dir / f"node{index}",
        )

    def all_nodes(self) -> list[Node]:
        return [self.node(k) for k in range(1, self.nodes + 1)]

    def labels(self, node: Node) -> dict[str, str]:
        rings = self.rings_node and node.index == self.nodes
        return dict(RINGS_NODE_LABELS if rings else NPU_MODEL_LABELS)


def load_config(name: str) -> LabConfig | None:
    path = LabConfig(name=name).config_file
    if not path.exists():
        return None
    return LabConfig(**json.loads(path.read_text()))


# ---------------------------------------------------------------------------------------
# cgroups: the lab's processes are exactly those in CGROUP_BASE/<lab> of the pids hierarchy


def cgroup_hierarchies() -> list[tuple[str, str, str]]:
    """(mount point, fstype, mount options) of the root namespace's cgroup mounts, in order."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        fstype, _, superopts = post.split(" ", 2)
        mount_point = pre.split(" ")[4]
        if fstype in ("cgroup", "cgroup2") and mount_point.startswith(str(CGROUP_FS) + "/"):
            opts = [o for o in superopts.split(",") if o not in ("rw", "ro")]
            found.append((mount_point, fstype, ",".join(opts)))
    return found


def pids_hierarchy() -> Path:
    for mount_point, fstype, opts in cgroup_hierarchies():
        if fstype == "cgroup" and "pids" in opts.split(","):
            return Path(mount_point)
    raise LabError(
        "no cgroup v1 pids hierarchy under /sys/fs/cgroup: the lab needs one to track its processes"
    )


def cgroup_pids(relative: str) -> list[int]:
    """PIDs in a pids cgroup and all its descendants."""
    top = pids_hierarchy() / relative
    pids = []
    for procs in top.rglob("cgroup.procs") if top.exists() else []:
        with contextlib.suppress(FileNotFoundError):
            pids += [int(p) for p in procs.read_text().split()]
    return pids


def remove_cgroup_trees(relative: str) -> None:
    """rmdir the cgroup directories (deepest first) in every hierarchy; they must be empty."""
    for mount_point, _, _ in cgroup_hierarchies():
        top = Path(mount_point) / relative
        if not top.exists():
            continue
        for directory in sorted(
            (p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
        ):
            directory.rmdir()
        top.rmdir()
        with contextlib.suppress(OSError):  # shared by other labs: remove only when empty
            top.parent.rmdir()


def memory_kib(pids: list[int], source: str, key: str) -> int:
    """Sum of one /proc/<pid>/<source> field (e.g. status VmRSS:, smaps_rollup Pss:)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, PermissionError):
            for line in Path(f"/proc/{pid}/{source}").read_text().splitlines():
                if line.startswith(key):
                    total += int(line.split()[1])
    return total


def kill_cgroup(relative: str, timeout: float = KILL_TIMEOUT) -> None:
    """SIGKILL every process in the cgroup tree until none is left."""

    def empty() -> bool:
        pids = cgroup_pids(relative)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return not pids

    wait_for(empty, f"the processes of cgroup {relative} to die", timeout)


# ---------------------------------------------------------------------------------------
# network


def netns_list() -> list[str]:
    return [
        line.split()[0] for line in run("ip", "netns", "list").stdout.splitlines() if line.strip()
    ]


def write_sysctl(netns: str | None, key: str, value: str) -> None:
    cmd = ["ip", "netns", "exec", netns] if netns else []
    run(*cmd, "sysctl", "-q", "-w", f"{key}={value}")


def create_bridge(cfg: LabConfig) -> None:
    br = cfg.bridge_netns
    run("ip", "netns", "add", br)
    run("ip", "-n", br, "link", "set", "lo", "up")
    run("ip", "-n", br, "link", "add", "br0", "type", "bridge")
    run("ip", "-n", br, "link", "set", "br0", "up")
    run("ip", "link", "add", cfg.root_veth, "type", "veth", "peer", "name", "root", "netns", br)
    run("ip", "-n", br, "link", "set", "root", "master", "br0", "up")
    # Forwarding off on the root side: the root namespace only talks to the nodes, it never
    # routes their traffic anywhere else.
    write_sysctl(None, f"net.ipv4.conf.{cfg.root_veth}.forwarding", "0")
    write_sysctl(None, f"net.ipv6.conf.{cfg.root_veth}.disable_ipv6", "1")
    run("ip", "addr", "add", f"{cfg.root_address}/24", "dev", cfg.root_veth)
    run("ip", "link", "set", cfg.root_veth, "up")


def create_node_network(cfg: LabConfig, node: Node) -> None:
    run("ip", "netns", "add", node.netns)
    run("ip", "-n", node.netns, "link", "set", "lo", "up")
    peer = ["peer", "name", "eth0", "netns", node.netns]
    run("ip", "-n", cfg.bridge_netns, "link", "add", node.bridge_port, "type", "veth", *peer)
    run("ip", "-n", cfg.bridge_netns, "link", "set", node.bridge_port, "master", "br0", "up")
    run("ip", "-n", node.netns, "addr", "add", f"{node.address}/24", "dev", "eth0")
    run("ip", "-n", node.netns, "link", "set", "eth0", "up")  # no default route: on purpose


def write_node_etc(cfg: LabConfig, node: Node) -> None:
    """Files that `ip netns exec` binds over /etc for this node only."""
    (node.etc_dir / "docker").mkdir(parents=True, exist_ok=True)  # own engine key
    hosts = ["127.0.0.1 localhost", f"{cfg.root_address} {cfg.name}-host"]
    hosts += [f"{n.address} {n.hostname}" for n in cfg.all_nodes()]
    (node.etc_dir / "hosts").write_text("\n".join(hosts) + "\n")
    # Loopback only: Docker then falls back to public resolvers for containers, which the
    # node's missing default route makes unreachable at once, so no query leaves the lab.
    (node.etc_dir / "resolv.conf").write_text("nameserver 127.0.0.1\n")


# ---------------------------------------------------------------------------------------
# node processes: a holder keeps the node's namespaces; dockerd joins them


def make_fake_npus(cfg: LabConfig, node: Node) -> None:
    """Stand-ins for /dev/davinciN and the control devices, and for the driver files the real
    runtime mounts (lib64, dcmi, npu-smi, hccn_tool), all bind-mounted by the shim."""
    node.dev_dir.mkdir(parents=True, exist_ok=True)
    for name in [f"davinci{i}" for i in range(cfg.npus)] + list(CONTROL_DEVICES):
        (node.dev_dir / name).write_text(f"fake Ascend device {name} of {node.hostname}\n")
    lib64 = node.driver_dir / "lib64"
    lib64.mkdir(parents=True, exist_ok=True)
    (lib64 / "libascend_hal.so").write_text("fake driver library\n")
    (node.driver_dir / "dcmi").mkdir(exist_ok=True)
    (node.driver_dir / "dcmi" / "npus").write_text("".join(f"{i}\n" for i in range(cfg.npus)))
    shutil.copyfile(FAKE_NPU_SMI, node.driver_dir / "npu-smi")
    (node.driver_dir / "npu-smi").chmod(0o755)
    shutil.copyfile(FAKE_HCCN_TOOL, node.driver_dir / "hccn_tool")
    (node.driver_dir / "hccn_tool").chmod(0o755)
    (node.driver_dir / "dcmi" / ROCE_STATE).write_text(json.dumps(roce_state(cfg, node.index, {})))


def roce_state(cfg: LabConfig, index: int, roce: dict[str, dict]) -> dict:
    """What node `index`'s stand-in hccn_tool reads: which node it is, and every node's NPUs
    with the RoCE state tests set for them (node -> NPU -> keys), for `-ping`."""
    return {
        "node": index,
        "nodes": {
            str(n.index): {"npus": list(range(cfg.npus)), "roce": roce.get(str(n.index), {})}
            for n in cfg.all_nodes()
        },
    }


def openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise LabError(f"openssl {' '.join(args)} failed: {result.stderr.strip()}")


def make_certificates(directory: Path, server_ip: str, server_name: str) -> None:
    """A CA, a server certificate for the manager's address and a client certificate, laid
    out as Docker's "protect the daemon socket" guide does. EC keys: generated in ms."""
    directory.mkdir(parents=True)
    client = directory / "client"
    client.mkdir()
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *key, "-days", TLS_DAYS, "-subj", "/CN=npuswarm-lab-ca",
            "-keyout", "ca-key.pem", "-out", "ca.pem", cwd=directory)  # fmt: skip
    for name, subject, extensions in (
        ("server", f"/CN={server_name}",
         f"subjectAltName=IP:{server_ip},DNS:{server_name}\nextendedKeyUsage=serverAuth"),
        ("client", "/CN=npuswarm", "extendedKeyUsage=clientAuth"),
    ):  # fmt: skip
        (directory / f"{name}.ext").write_text(extensions + "\n")
        openssl("req", *key, "-subj", subject, "-keyout", f"{name}-key.pem",
                "-out", f"{name}.csr", cwd=directory)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem",
                "-CAcreateserial", "-days", TLS_DAYS, "-extfile", f"{name}.ext",
                "-out", f"{name}-cert.pem", cwd=directory)  # fmt: skip
    shutil.copy(directory / "ca.pem", client / "ca.pem")
    shutil.copy(directory / "client-cert.pem", client / "cert.pem")
    shutil.copy(directory / "client-key.pem", client / "key.pem")


def daemon_config(cfg: LabConfig, node: Node) -> dict:
    hosts = [node.endpoint]
    tls: dict = {}
    if cfg.tls and node.is_manager:
        # The unix socket stays as it is (TLS applies to TCP listeners only).
        hosts.append(f"tcp://{node.address}:{TLS_PORT}")
        tls = {
            "tlsverify": True,
            "tlscacert": str(cfg.tls_dir / "ca.pem"),
            "tlscert": str(cfg.tls_dir / "server-cert.pem"),
            "tlskey": str(cfg.tls_dir / "server-key.pem"),
        }
    return tls | {
        "data-root": str(node.state_dir / "docker"),
        "exec-root": str(node.run_dir / "exec"),
        "pidfile": str(node.pidfile),
        "hosts": hosts,
        "cgroup-parent": "/" + node.cgroup,
        "exec-opts": ["native.cgroupdriver=cgroupfs"],
        "storage-driver": "overlay2",
        "log-level": "warn",
        "log-driver": "json-file",
        "log-opts": {"max-size": "5m", "max-file": "1"},
        "node-generic-resources": [f"NPU=davinci{i}" for i in range(cfg.npus)],
        "default-runtime": "ascend",
        "runtimes": {
            "ascend": {"path": str(SHIM), "runtimeArgs": [f"--npu-dev-dir={node.dev_dir}"]}
        },
        "features": {"buildkit": False},
    }


def holder_script(node: Node) -> str:
    """Runs inside the node's namespaces (after `ip netns exec`, which remounted /sys)."""
    lines = [
        "set -e",
        f"hostname {node.hostname}",
        f"mount -t tmpfs -o mode=755 npuswarm-lab {CGROUP_FS}",
    ]
    # Re-mount the host's cgroup hierarchies in the host's order: runc takes the cgroup root
    # from the first cgroup mount, so a v1 controller must come first, as on the host.
    for mount_point, fstype, opts in cgroup_hierarchies():
        mount_opts = f"-o {opts} " if opts else ""
        lines += [
            f"mkdir -p {mount_point}",
            f"mount -t {fstype} {mount_opts}{fstype} {mount_point}",
        ]
    # Private /run/docker and /run/containerd: otherwise this dockerd would find the machine's
    # containerd socket and use it instead of its own, and would share libnetwork's sockets.
    for directory in ("/run/docker", "/run/containerd"):
        lines += [f"mkdir -p {directory}", f"mount -t tmpfs -o mode=711 npuswarm-lab {directory}"]
    lines.append("exec sleep infinity")
    return "\n".join(lines)


def spawn_in_cgroup(
    relative: str, argv: list[str], logfile: Path, env: dict | None = None
) -> subprocess.Popen:
    """Start argv with its first instruction being to join the cgroup, so every process it
    ever forks is in the lab's cgroup before it exists."""
    procs = pids_hierarchy() / relative / "cgroup.procs"
    wrapper = ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "npuswarm-lab", *argv]
    with open(logfile, "ab") as out:
        return subprocess.Popen(
            wrapper,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=env or {"PATH": DAEMON_ENV_PATH},
            start_new_session=True,
        )


def start_holder(node: Node) -> int:
    proc = spawn_in_cgroup(
        node.daemon_cgroup,
        ["ip", "netns", "exec", node.netns, "unshare", "--uts", "sh", "-c", holder_script(node)],
        node.state_dir / "holder.log",
    )
    wait_for(
        lambda: (
            proc.poll() is not None or Path(f"/proc/{proc.pid}/comm").read_text().strip() == "sleep"
        ),
        f"the namespaces of {node.hostname}",
        10,
    )
    if proc.poll() is not None:
        raise LabError(
            f"setting up {node.hostname} failed: {(node.state_dir / 'holder.log').read_text()}"
        )
    (node.run_dir / "holder.pid").write_text(str(proc.pid))
    return proc.pid


# Starts of a stopped node dockerd that exit on their own before answering, tried again.
START_ATTEMPTS = 3


def start_dockerd(node: Node) -> subprocess.Popen:
    holder = int((node.run_dir / "holder.pid").read_text())
    env = {
        "PATH": DAEMON_ENV_PATH,
        "HOME": "/root",
        # Swarm tasks use the imported image instead of trying a registry first.
        "DOCKER_SERVICE_PREFER_OFFLINE_IMAGE": "1",
    }
    argv = [
        "nsenter",
        f"--target={holder}",
        "--mount",
        "--uts",
        "--net",
        "--",
        "dockerd",
        f"--config-file={node.state_dir / 'daemon.json'}",
    ]
    return spawn_in_cgroup(node.daemon_cgroup, argv, node.state_dir / "dockerd.log", env)


def dockerd_pid(node: Node) -> int | None:
    """PID of the node's live dockerd (a zombie does not count: it waits for our reaping)."""
    with contextlib.suppress(FileNotFoundError, ValueError):
        pid = int(node.pidfile.read_text())
        stat = Path(f"/proc/{pid}/stat").read_text()
        comm, state = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2]
        if comm == "dockerd" and state != "Z":
            return pid
    return None


def ping(node: Node) -> bool:
    return docker_client(node.endpoint, timeout=5).ping()


def wait_dockerd(node: Node, proc: subprocess.Popen | None = None) -> None:
    def up() -> bool:
        if proc is not None and proc.poll() is not None:
            raise LabError(
                f"dockerd of {node.hostname} exited: {tail(node.state_dir / 'dockerd.log')}"
            )
        return node.socket.exists() and ping(node)

    try:
        wait_for(up, f"dockerd of {node.hostname} to answer on {node.socket}", DAEMON_START_TIMEOUT)
    except LabError as exc:
        raise LabError(f"{exc}\n{tail(node.state_dir / 'dockerd.log')}") from None


def tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(FileNotFoundError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


# ---------------------------------------------------------------------------------------
# swarm


def init_swarm(cfg: LabConfig) -> None:
    manager = cfg.node(1)
    client = docker_client(manager.endpoint)
    client.swarm.init(
        advertise_addr=manager.address,
        listen_addr=f"{manager.address}:2377",
        default_addr_pool=[OVERLAY_POOL],
        subnet_size=24,
        dispatcher_heartbeat_period=DISPATCHER_HEARTBEAT_NS,
    )
    token = client.swarm.attrs["JoinTokens"]["Worker"]
    for node in cfg.all_nodes()[1:]:
        docker_client(node.endpoint).swarm.join(
            remote_addrs=[f"{manager.address}:2377"],
            join_token=token,
            listen_addr=f"{node.address}:2377",
            advertise_addr=node.address,
        )


def swarm_nodes(cfg: LabConfig) -> dict[str, dict]:
    """Swarm node objects by hostname, as the manager sees them."""
    nodes = docker_client(cfg.node(1).endpoint).api.nodes()
    return {n["Description"]["Hostname"]: n for n in nodes}


def all_ready(cfg: LabConfig) -> bool:
    nodes = swarm_nodes(cfg)
    return all(
        nodes.get(n.hostname, {}).get("Status", {}).get("State") == "ready" for n in cfg.all_nodes()
    )


def label_nodes(cfg: LabConfig) -> None:
    api = docker_client(cfg.node(1).endpoint).api
    nodes = swarm_nodes(cfg)
    for node in cfg.all_nodes():
        obj = nodes[node.hostname]
        spec = dict(obj["Spec"], Labels={**obj["Spec"].get("Labels", {}), **cfg.labels(node)})
        api.update_node(obj["ID"], obj["Version"]["Index"], spec)


# ---------------------------------------------------------------------------------------
# image


def build_image() -> tuple[Path, str]:
    """(tarball, key) of the fake vLLM image; built once and cached outside the repo."""
    tarball = Path(run(str(BUILD_IMAGE)).stdout.strip())
    return tarball, tarball.stem.removeprefix("fake-vllm-")  # named by its content hash


def import_image(node: Node, tarball: Path, key: str) -> None:
    client = docker_client(node.endpoint, timeout=300)
    with contextlib.suppress(Exception):
        if client.images.get(IMAGE).labels.get(IMAGE_KEY_LABEL) == key:
            return
    repository, tag = IMAGE.split(":")
    client.api.import_image_from_file(
        str(tarball),
        repository=repository,
        tag=tag,
        changes=[*IMAGE_CHANGES, f"LABEL {IMAGE_KEY_LABEL}={key}"],
    )


# ---------------------------------------------------------------------------------------
# the lab


@dataclass
class Lab:
    """A running lab: `endpoint` is the manager's Docker endpoint, `nodes` all its nodes."""

    config: LabConfig
    bring_up_seconds: float | None = None
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def nodes(self) -> list[Node]:
        return self.config.all_nodes()

    @property
    def manager(self) -> Node:
        return self.config.node(1)

    @property
    def endpoint(self) -> str:
        return self.manager.endpoint

    @property
    def tls_endpoint(self) -> str:
        """The manager over TCP with TLS (``up --tls``); use with DOCKER_TLS_VERIFY=1 and
        DOCKER_CERT_PATH=``tls_client_dir``."""
        if not self.config.tls:
            raise LabError(f"lab {self.name} was brought up without --tls")
        return f"tcp://{self.manager.address}:{TLS_PORT}"

    @property
    def tls_client_dir(self) -> Path:
        return self.config.tls_dir / "client"

    def node(self, index: int) -> Node:
        if not 1 <= index <= self.config.nodes:
            raise LabError(f"lab {self.name} has no node {index}")
        return self.config.node(index)

    def client(self, index: int = 1):
        """A docker SDK client of node `index` (cluster calls answer only on the manager)."""
        return docker_client(self.node(index).endpoint)

    def swarm_node(self, index: int) -> dict:
        """The manager's view of a node: ID, Status.State ('ready'/'down'), Spec.Labels, ..."""
        hostname = self.node(index).hostname
        nodes = swarm_nodes(self.config)
        if hostname not in nodes:
            raise LabError(f"the manager does not list {hostname}")
        return nodes[hostname]

    def node_id(self, index: int) -> str:
        return self.swarm_node(index)["ID"]

    def wait_node_state(self, index: int, state: str, timeout: float = 30.0) -> float:
        """Wait until the manager reports node `index` in `state`; returns the seconds it took."""
        began = time.monotonic()
        wait_for(
            lambda: self.swarm_node(index)["Status"]["State"] == state,
            f"{self.node(index).hostname} to be {state}",
            timeout,
        )
        return time.monotonic() - began

    # --- failure injection --------------------------------------------------------------
    def kill_dockerd(self, index: int) -> None:
        """SIGKILL the node's dockerd only, as a daemon crash does. Its containerd dies with it
        (dockerd starts it with a parent-death signal); shims and containers stay."""
        node = self.node(index)
        pid = dockerd_pid(node)
        if pid is None:
            raise LabError(f"dockerd of {node.hostname} is not running")
        os.kill(pid, signal.SIGKILL)
        wait_for(
            lambda: dockerd_pid(node) is None, f"dockerd of {node.hostname} to die", KILL_TIMEOUT
        )
        self._reap()

    def start_dockerd(self, index: int) -> None:
        """(Re)start the node's dockerd in the node's namespaces and wait until it answers."""
        node = self.node(index)
        if dockerd_pid(node) is not None:
            raise LabError(f"dockerd of {node.hostname} is already running")
        for attempt in range(1, START_ATTEMPTS + 1):
            proc = start_dockerd(node)
            self._procs[f"dockerd{index}"] = proc
            try:
                wait_dockerd(node, proc)
                return
            except LabError as error:
                # On a loaded machine dockerd gives up on its managed containerd after ~20 s
                # ("failed to start containerd: timeout") and exits: that start is tried again.
                if proc.poll() is None or attempt == START_ATTEMPTS:
                    raise
                print(f"swarmlab: dockerd of {node.hostname} exited ({str(error)[:120]}...); "
                      f"starting it again", file=sys.stderr)

    def restart_dockerd(self, index: int) -> None:
        self.kill_dockerd(index)
        self.start_dockerd(index)

    def disconnect(self, index: int) -> None:
        """Cut the node off the lab network (its bridge port goes down), as a pulled cable does."""
        self._set_bridge_port(index, "down")

    def reconnect(self, index: int) -> None:
        self._set_bridge_port(index, "up")

    def _set_bridge_port(self, index: int, state: str) -> None:
        port = self.node(index).bridge_port
        run("ip", "-n", self.config.bridge_netns, "link", "set", port, state)

    # --- node health ----------------------------------------------------------------------
    def set_runtime_installed(self, index: int, installed: bool) -> None:
        """Make node `index`'s runtime behave as if Ascend Docker Runtime were not installed
        (not the default runtime): new containers get no NPUs, driver files or marker env."""
        marker = self.node(index).state_dir / "runtime-not-installed"
        if installed:
            marker.unlink(missing_ok=True)
        else:
            marker.write_text("the stand-in Ascend runtime is switched off on this node\n")

    def mask_path(self, index: int, path: str) -> None:
        """Hide what is at ``path`` (a directory) from node `index` only: an empty tmpfs over
        it in the node's mount namespace, as if the node's disk lacked those files (the lab's
        nodes otherwise share this machine's filesystem). Containers created afterwards see
        the empty directory; `unmask_path` undoes it."""
        holder = (self.node(index).run_dir / "holder.pid").read_text().strip()
        run("nsenter", f"--target={holder}", "--mount", "--",
            "mount", "-t", "tmpfs", "-o", "mode=755,size=1m", "npuswarm-lab-mask", path)

    def unmask_path(self, index: int, path: str) -> None:
        holder = (self.node(index).run_dir / "holder.pid").read_text().strip()
        run("nsenter", f"--target={holder}", "--mount", "--", "umount", path, check=False)

    def set_npu_state(self, index: int, npus: dict[int, dict]) -> None:
        """What node `index`'s stand-in npu-smi reports, per NPU id: health ("OK", "Warning",
        "Alarm", "Critical"), error_codes [int, e.g. 0x80E18402], error_information [str],
        temperature_c, power_w, aicore_percent, hbm_used_mb, hbm_total_mb, processes
        [{pid, name, memory_mb}]. NPUs and keys left out are healthy and idle (see
        hack/fake-npu-smi). Replaces what was set before; read live by every `npu-smi`."""
        state = {"npus": {str(k): v for k, v in npus.items()}}
        path = self.node(index).driver_dir / "dcmi" / "npu-smi-state.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)

    def set_roce_state(self, index: int, npus: dict[int, dict]) -> None:
        """What the stand-in hccn_tool reports for node `index`'s NPUs' RoCE NICs, per NPU id:
        link ("UP"/"DOWN"), net_health ("Success", "Fault", "Init", ...), ip, netmask, gateway,
        netdetect (None: not configured). NPUs and keys left out take the defaults (link UP,
        net health Success, ip 192.168.<100+npu>.<index>/24; see hack/fake-hccn-tool).
        Replaces what was set for that node before. Every node's file is rewritten, since
        `-ping` on any node answers only for addresses of NPUs whose link is UP."""
        path = self.node(index).driver_dir / "dcmi" / ROCE_STATE
        roce: dict[str, dict] = {}
        if path.exists():  # (not in a lab brought up before the stand-in hccn_tool)
            roce = {k: v["roce"] for k, v in json.loads(path.read_text())["nodes"].items()}
        roce[str(index)] = {str(k): v for k, v in npus.items()}
        for node in self.nodes:
            path = node.driver_dir / "dcmi" / ROCE_STATE
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(roce_state(self.config, node.index, roce)))
            os.replace(tmp, path)

    # --- images ---------------------------------------------------------------------------
    def load_image(self, tag: str) -> None:
        """Copy an image of the machine's default dockerd onto every node that lacks it (the
        lab has no registry), e.g. the operator's image for its node agents."""
        missing = [n for n in self.nodes if not docker_client(n.endpoint).images.list(name=tag)]
        if not missing:
            return
        with tempfile.TemporaryDirectory() as scratch:
            tarball = Path(scratch) / "image.tar"
            run("docker", "save", "-o", str(tarball), tag)
            for node in missing:
                with tarball.open("rb") as data:
                    docker_client(node.endpoint, timeout=300).images.load(data)

    # --- accounting ---------------------------------------------------------------------
    def memory_kib(self) -> dict[str, int]:
        """Memory of what the lab started, in KiB: RSS and PSS (RSS counts the pages that the
        nodes' dockerds share once per node) of the daemons (dockerd, containerd, shims,
        holders), and RSS of the containers."""
        daemons = [pid for n in self.nodes for pid in cgroup_pids(n.daemon_cgroup)]
        containers = sorted(set(cgroup_pids(self.config.cgroup)) - set(daemons))
        return {
            "daemons_rss": memory_kib(daemons, "status", "VmRSS:"),
            "daemons_pss": memory_kib(daemons, "smaps_rollup", "Pss:"),
            "containers_rss": memory_kib(containers, "status", "VmRSS:"),
        }

    def _reap(self) -> None:
        for proc in self._procs.values():
            proc.poll()


def leftovers(cfg: LabConfig) -> list[str]:
    """What exists of a lab of this name, whether or not it is complete."""
    found = [str(p) for p in (cfg.run_dir, cfg.state_dir) if p.exists()]
    found += [f"netns {ns}" for ns in netns_list() if ns.startswith(f"npsl-{cfg.name}-")]
    if run("ip", "link", "show", cfg.root_veth, check=False).returncode == 0:
        found.append(f"interface {cfg.root_veth}")
    if (pids_hierarchy() / cfg.cgroup).exists():
        found.append(f"cgroup {cfg.cgroup}")
    found += [str(p) for p in Path("/etc/netns").glob(f"npsl-{cfg.name}-*")]
    return found


def healthy(cfg: LabConfig) -> bool:
    try:
        return all(ping(n) for n in cfg.all_nodes()) and all_ready(cfg)
    except Exception:
        return False


def check_subnet_free(cfg: LabConfig) -> None:
    routes = run("ip", "-4", "route", "show", cfg.subnet).stdout.strip()
    if routes:
        raise LabError(
            f"subnet {cfg.subnet} is already routed here ({routes}); another lab uses it: "
            f"choose another --octet / NPUSWARM_LAB_OCTET"
        )


def up(cfg: LabConfig) -> Lab:
    """Bring the lab up. Idempotent when the same lab is up and healthy; refuses over leftovers."""
    existing = load_config(cfg.name)
    if existing is not None and healthy(existing):
        if existing != cfg:
            raise LabError(
                f"lab {cfg.name} is already up as {existing}; "
                f"`hack/swarm-lab down --name {cfg.name}` first"
            )
        return Lab(existing)
    found = leftovers(cfg)
    if found:
        raise LabError(
            f"leftovers of lab {cfg.name} exist: {', '.join(found)}; "
            f"run `hack/swarm-lab down --name {cfg.name}` first"
        )
    check_subnet_free(cfg)
    began = time.monotonic()
    tarball, key = build_image()
    lab = Lab(cfg)
    try:
        create_lab(lab, tarball, key)
    except BaseException:
        log(f"bring-up of {cfg.name} failed; tearing down what was started")
        down(cfg.name, lab)
        raise
    lab.bring_up_seconds = time.monotonic() - began
    return lab


def create_lab(lab: Lab, tarball: Path, key: str) -> None:
    cfg = lab.config
    for directory in (cfg.run_dir, cfg.state_dir):
        directory.mkdir(parents=True)
    # The nodes' data (images, layers, Swarm state) lives on a tmpfs: the lab is disposable,
    # and deleting three data-roots (10,000 files) from this disk took ~10 s; a umount, none.
    run(
        "mount",
        "-t",
        "tmpfs",
        "-o",
        f"size={STATE_TMPFS_SIZE},mode=755",
        "npuswarm-lab",
        str(cfg.state_dir),
    )
    cfg.config_file.write_text(json.dumps(asdict(cfg)))
    if cfg.tls:
        manager = cfg.node(1)
        make_certificates(cfg.tls_dir, manager.address, manager.hostname)
    create_bridge(cfg)
    for node in cfg.all_nodes():
        node.run_dir.mkdir()
        node.state_dir.mkdir()
        (pids_hierarchy() / node.daemon_cgroup).mkdir(parents=True)
        create_node_network(cfg, node)
        write_node_etc(cfg, node)
        make_fake_npus(cfg, node)
        (node.state_dir / "daemon.json").write_text(json.dumps(daemon_config(cfg, node), indent=2))
        start_holder(node)
        lab._procs[f"dockerd{node.index}"] = start_dockerd(node)
    for node in cfg.all_nodes():
        wait_dockerd(node, lab._procs[f"dockerd{node.index}"])
    with ThreadPoolExecutor(max_workers=cfg.nodes + 1) as pool:
        # The imports take longest; they need no Swarm, so they overlap with forming it.
        imports = [pool.submit(import_image, node, tarball, key) for node in cfg.all_nodes()]
        init_swarm(cfg)
        wait_for(lambda: all_ready(cfg), f"all {cfg.nodes} nodes to be Ready", SWARM_READY_TIMEOUT)
        label_nodes(cfg)
        for future in imports:
            future.result()


def down(name: str, lab: Lab | None = None) -> list[str]:
    """Tear down everything of lab `name` that exists; returns what was removed."""
    cfg = load_config(name) or LabConfig(name=name)
    removed = leftovers(cfg)
    if (pids_hierarchy() / cfg.cgroup).exists():
        kill_cgroup(cfg.cgroup)
        remove_cgroup_trees(cfg.cgroup)
    if lab is not None:
        lab._reap()
    for ns in netns_list():
        if ns.startswith(f"npsl-{cfg.name}-"):
            run("ip", "netns", "del", ns)
    if run("ip", "link", "show", cfg.root_veth, check=False).returncode == 0:
        run("ip", "link", "del", cfg.root_veth)
    for etc in Path("/etc/netns").glob(f"npsl-{cfg.name}-*"):
        shutil.rmtree(etc)
    for directory in (cfg.run_dir, cfg.state_dir):
        if directory.exists():
            unmount_all(directory)
            shutil.rmtree(directory)
        with contextlib.suppress(OSError):  # shared by other labs: remove only when empty
            directory.parent.rmdir()
    return removed


def unmount_all(directory: Path) -> None:
    """Unmount the state tmpfs and anything below `directory` in the root namespace (the
    nodes' own mounts live in their private mount namespaces and died with them)."""
    for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
        mount_point = line.split(" ")[4]
        if mount_point == str(directory) or mount_point.startswith(f"{directory}/"):
            run("umount", "-l", mount_point)


def status(name: str) -> dict:
    """What `hack/swarm-lab status` prints, as data."""
    cfg = load_config(name)
    if cfg is None:
        return {"name": name, "up": False, "leftovers": leftovers(LabConfig(name=name))}
    lab = Lab(cfg)
    try:
        swarm = swarm_nodes(cfg)
    except Exception as exc:
        swarm = {}
        log(f"manager does not answer: {exc}")
    nodes = []
    for node in cfg.all_nodes():
        obj = swarm.get(node.hostname, {})
        resources = obj.get("Description", {}).get("Resources", {}).get("GenericResources") or []
        nodes.append(
            {
                "index": node.index,
                "hostname": node.hostname,
                "address": node.address,
                "endpoint": node.endpoint,
                "dockerd_pid": dockerd_pid(node),
                "role": obj.get("Spec", {}).get("Role"),
                "state": obj.get("Status", {}).get("State"),
                "availability": obj.get("Spec", {}).get("Availability"),
                "npus": sorted(
                    r["NamedResourceSpec"]["Value"] for r in resources if "NamedResourceSpec" in r
                ),
                "labels": obj.get("Spec", {}).get("Labels", {}),
            }
        )
    return {
        "name": name,
        "up": True,
        "endpoint": lab.endpoint,
        "subnet": cfg.subnet,
        "nodes": nodes,
        "memory_kib": lab.memory_kib(),
        "tls_endpoint": lab.tls_endpoint if cfg.tls else None,
        "tls_client_dir": str(lab.tls_client_dir) if cfg.tls else None,
    }


@contextlib.contextmanager
def lab_session(
    nodes: int = 3,
    npus: int = 8,
    rings_node: bool = False,
    name: str = "npsltest",
    octet: int = -1,
    tls: bool = False,
) -> Iterator[Lab]:
    """A lab for one test session: leftovers of a lab of this name (a crashed earlier run)
    are removed first, and the lab is torn down on exit, whatever happened inside.
    Test folders that need labs at the same time must give them different names."""
    if os.geteuid() != 0:
        raise LabError("the Swarm lab needs root (network namespaces, cgroups, dockerd)")
    cfg = LabConfig(name=name, nodes=nodes, npus=npus, rings_node=rings_node, octet=octet, tls=tls)
    owner = session_owner(cfg)
    if owner is not None:
        raise LabError(
            f"lab {name} belongs to the live test session of pid {owner}; "
            "give this session's lab another name (e.g. NPUSWARM_TEST_LAB_NAME)"
        )
    if leftovers(cfg):
        log(f"removing leftovers of an earlier lab {name}")
        down(name)
    lab = up(cfg)
    try:
        (cfg.run_dir / "session.pid").write_text(str(os.getpid()))
        yield lab
    finally:
        down(name, lab)


def session_owner(cfg: LabConfig) -> int | None:
    """PID of the live process whose lab_session holds this lab (this process included:
    two fixtures of one pytest session must not share, and so destroy, one lab)."""
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        pid = int((cfg.run_dir / "session.pid").read_text())
        os.kill(pid, 0)
        return pid
    return None
