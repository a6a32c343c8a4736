#!/usr/bin/env python3
"""A real local Kubernetes control plane (etcd + kube-apiserver) for tests.

Standard library only, so any test folder can use it before the project's
own dependencies are installed::

    sys.path.insert(0, "hack/lib")
    import controlplane

    with controlplane.running() as cp:
        subprocess.run([str(cp.kubectl), "--kubeconfig", str(cp.kubeconfig), ...])

CLI, for people and for CI scripts (the processes outlive the ``up`` call)::

    hack/control-plane up --dir D      # prints shell exports
    hack/control-plane env --dir D     # the same exports again
    hack/control-plane down --dir D

The binaries come from ``hack/build-controlplane``. There is no
controller-manager and no scheduler: namespaces are never finalized after a
delete, no ServiceAccount or token is created by itself, nothing garbage
collects owned objects, and pods stay Pending. See docs/control-plane.md.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import json
import os
import secrets
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from localrun import free_port

HACK_DIR = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = HACK_DIR / "build-controlplane"
VERSION_FILE = HACK_DIR / "controlplane" / "k8s-version"
STATE_FILE = "controlplane.json"

ADMIN_USER = "npuswarm-admin"
TEST_USER = "npuswarm-test-user"
SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/24"
CLUSTER_NAME = "npuswarm-test"

BINARIES = ("etcd", "kube-apiserver", "kubectl")


class ControlPlaneError(RuntimeError):
    """The control plane could not be started or stopped."""


class BinariesMissingError(ControlPlaneError):
    """etcd / kube-apiserver / kubectl have not been built yet."""


@dataclasses.dataclass(frozen=True)
class ControlPlane:
    state_dir: Path
    server: str  # https://127.0.0.1:<port>
    kubeconfig: Path  # admin: group system:masters
    user_kubeconfig: Path  # TEST_USER: authenticated, no groups, no RBAC grants
    admin_token: str
    user_token: str
    user_name: str
    ca_file: Path  # the apiserver's self-signed serving certificate bundle
    etcd_url: str
    kubectl: Path
    bin_dir: Path
    k8s_version: str
    pids: dict[str, int]  # binary name -> pid, the only processes stop() may signal
    # How kube-apiserver was started, so that an outage test can stop it and start it again.
    apiserver_argv: list[str] = dataclasses.field(default_factory=list)

    def env(self) -> dict[str, str]:
        """Variables that point clients at this control plane."""
        return {
            "KUBECONFIG": str(self.kubeconfig),
            "NPUSWARM_USER_KUBECONFIG": str(self.user_kubeconfig),
            "NPUSWARM_APISERVER": self.server,
            "NPUSWARM_KUBECTL": str(self.kubectl),
            "NPUSWARM_CONTROLPLANE_DIR": str(self.state_dir),
        }

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key, value in data.items():
            if isinstance(value, Path):
                data[key] = str(value)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ControlPlane:
        kwargs = dict(data)
        for field in dataclasses.fields(cls):
            if field.type == "Path":
                kwargs[field.name] = Path(kwargs[field.name])
        return cls(**kwargs)


# --- binaries ---------------------------------------------------------------


def k8s_version() -> str:
    return os.environ.get("K8S_VERSION") or VERSION_FILE.read_text().strip()


def bin_dir() -> Path:
    """Where hack/build-controlplane puts (or put) the binaries."""
    override = os.environ.get("NPUSWARM_CONTROLPLANE_BIN")
    if override:
        return Path(override)
    cache = os.environ.get("NPUSWARM_CACHE") or str(Path.home() / ".cache" / "npuswarm")
    return Path(cache) / "controlplane" / k8s_version()


def binaries() -> dict[str, Path]:
    """Paths of etcd, kube-apiserver and kubectl; raises BinariesMissingError."""
    directory = bin_dir()
    paths = {name: directory / name for name in BINARIES}
    missing = [name for name, path in paths.items() if not os.access(path, os.X_OK)]
    if missing:
        raise BinariesMissingError(
            f"control plane binaries missing in {directory}: {', '.join(missing)}. "
            f"Build them with `{BUILD_SCRIPT}` (about 7 minutes cold, "
            "seconds once built; needs Go and the Go module proxy)."
        )
    return paths


def kubectl_path() -> Path:
    """The kubectl built with the control plane, matching its version."""
    return binaries()["kubectl"]


# --- processes ---------------------------------------------------------------


def _spawn(argv: list[str], log_path: Path, die_with_parent: bool) -> subprocess.Popen[bytes]:
    setpriv = shutil.which("setpriv")
    if die_with_parent and setpriv:
        # If the test process is killed outright, the servers get SIGTERM
        # instead of outliving it. setpriv sets the parent-death signal and
        # execs the server in the same process, so the recorded pid and
        # command line are the server's; preexec_fn could do the same but is
        # unsafe once the caller runs threads (kopf does).
        argv = [setpriv, "--pdeathsig", "TERM", "--", *argv]
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Own session: a Ctrl-C meant for the test runner must not stop
            # the servers before the fixture's teardown does.
            start_new_session=True,
            close_fds=True,
        )


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _proc_is_ours(pid: int, binary: str, state_dir: Path) -> bool:
    """True if pid still runs `binary` with this state dir in its arguments.

    A recorded pid may have been reused by an unrelated process once ours
    exited; only a process whose command line names both our binary and our
    state dir is signalled.
    """
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # A zombie has already exited; it only awaits its parent's wait().
    if stat.rpartition(")")[2].split()[0] == "Z":
        return False
    args = raw.decode(errors="replace").split("\0")
    if not args or Path(args[0]).name != binary:
        return False
    marker = str(state_dir)
    return any(marker in arg for arg in args[1:])


def _wait_gone(
    pid: int, binary: str, state_dir: Path, deadline: float, child: subprocess.Popen[bytes] | None
) -> bool:
    while time.monotonic() < deadline:
        if child is not None:
            if child.poll() is not None:
                return True
        elif not _proc_is_ours(pid, binary, state_dir):
            return True
        time.sleep(0.05)
    return False


def _terminate(
    pid: int,
    binary: str,
    state_dir: Path,
    timeout: float,
    child: subprocess.Popen[bytes] | None = None,
) -> None:
    if child is not None:
        # Our own unreaped child cannot be a recycled pid, and it may still be
        # setpriv about to exec the server, whose command line does not match.
        if child.poll() is not None:
            return
    elif not _proc_is_ours(pid, binary, state_dir):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if _wait_gone(pid, binary, state_dir, time.monotonic() + timeout, child):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if not _wait_gone(pid, binary, state_dir, time.monotonic() + 10, child):
        raise ControlPlaneError(f"{binary} (pid {pid}) did not exit after SIGKILL")


# --- files -------------------------------------------------------------------


def _write_private(path: Path, text: str) -> None:
    # Tokens and keys: readable by the owner only.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def _kubeconfig(server: str, ca_pem: bytes, user: str, token: str) -> str:
    # JSON is valid YAML, so kubectl, client-go, kopf and the Python
    # kubernetes client all read it, and no YAML library is needed here.
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": CLUSTER_NAME,
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(ca_pem).decode(),
                },
            }
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [
            {
                "name": f"{user}@{CLUSTER_NAME}",
                "context": {"cluster": CLUSTER_NAME, "user": user, "namespace": "default"},
            }
        ],
        "current-context": f"{user}@{CLUSTER_NAME}",
        "preferences": {},
    }
    return json.dumps(config, indent=2) + "\n"


def _service_account_keys(state_dir: Path) -> tuple[Path, Path]:
    key = state_dir / "sa.key"
    pub = state_dir / "sa.pub"
    subprocess.run(
        ["openssl", "genrsa", "-out", str(key), "2048"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        ["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(pub)],
        check=True,
        capture_output=True,
    )
    os.chmod(key, 0o600)
    return key, pub


def _save_state(state_dir: Path, data: dict[str, Any]) -> None:
    tmp = state_dir / (STATE_FILE + ".tmp")
    _write_private(tmp, json.dumps(data, indent=2) + "\n")
    os.replace(tmp, state_dir / STATE_FILE)


def _load_state(state_dir: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((state_dir / STATE_FILE).read_text())
        return data
    except FileNotFoundError:
        raise ControlPlaneError(f"no control plane state in {state_dir}") from None


# --- readiness ----------------------------------------------------------------


def _get(
    url: str,
    *,
    context: ssl.SSLContext | None = None,
    token: str | None = None,
    timeout: float = 2.0,
) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def _wait_until(
    what: str,
    check: Callable[[], tuple[bool, str]],
    deadline: float,
    procs: dict[str, subprocess.Popen[bytes]],
    logs: dict[str, Path],
) -> None:
    last_error = "never answered"
    while True:
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise ControlPlaneError(
                    f"{name} exited with {proc.returncode} while waiting for {what}; "
                    f"last lines of {logs[name]}:\n{_tail(logs[name])}"
                )
        try:
            ok, detail = check()
            if ok:
                return
            last_error = detail
        except (OSError, ssl.SSLError) as error:
            last_error = repr(error)
        if time.monotonic() >= deadline:
            raise ControlPlaneError(f"timed out waiting for {what}: {last_error}")
        time.sleep(0.1)


# --- start / stop ----------------------------------------------------------------


def start(
    state_dir: str | os.PathLike[str] | None = None,
    *,
    timeout: float = 90.0,
    die_with_parent: bool = True,
) -> ControlPlane:
    """Start etcd and kube-apiserver; return once /readyz answers ok.

    All state (etcd data, certificates, keys, tokens, kubeconfigs, logs, the
    pid record) lives in state_dir, which is created if needed; by default a
    new temporary folder. die_with_parent=False lets the servers outlive this
    process (the CLI's `up`); otherwise they get SIGTERM when the thread that
    started them ends.
    """
    paths = binaries()
    if state_dir is None:
        state_dir = tempfile.mkdtemp(prefix="npuswarm-controlplane-")
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    if (state_dir / STATE_FILE).exists():
        previous = _load_state(state_dir)
        recorded = previous.get("pids", {})
        if any(_proc_is_ours(pid, name, state_dir) for name, pid in recorded.items()):
            raise ControlPlaneError(
                f"a control plane is already running in {state_dir}; stop it with "
                f"`{HACK_DIR / 'control-plane'} down --dir {state_dir}`"
            )

    last_error: Exception | None = None
    # Ports are picked before the servers bind them; another process may take
    # one in between, so a failed bind is retried with fresh ports.
    for _attempt in range(3):
        try:
            return _start_once(state_dir, paths, timeout, die_with_parent)
        except _PortTakenError as error:
            last_error = error
    raise ControlPlaneError(f"could not find free ports: {last_error}")


class _PortTakenError(ControlPlaneError):
    pass


def _start_once(
    state_dir: Path, paths: dict[str, Path], timeout: float, die_with_parent: bool
) -> ControlPlane:
    deadline = time.monotonic() + timeout
    etcd_data = state_dir / "etcd"
    cert_dir = state_dir / "certs"
    # A retry after a lost port race starts from empty state.
    shutil.rmtree(etcd_data, ignore_errors=True)
    shutil.rmtree(cert_dir, ignore_errors=True)
    cert_dir.mkdir(mode=0o700)

    etcd_client_port, etcd_peer_port, apiserver_port = _distinct_ports(3)
    etcd_url = f"http://127.0.0.1:{etcd_client_port}"
    peer_url = f"http://127.0.0.1:{etcd_peer_port}"
    server = f"https://127.0.0.1:{apiserver_port}"

    admin_token = secrets.token_hex(24)
    user_token = secrets.token_hex(24)
    tokens = state_dir / "tokens.csv"
    # token,user,uid,"groups": system:masters bypasses RBAC; the test user has
    # no group beyond system:authenticated, which grants discovery only.
    _write_private(
        tokens,
        f'{admin_token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n'
        f"{user_token},{TEST_USER},{TEST_USER}\n",
    )
    sa_key, sa_pub = _service_account_keys(state_dir)

    logs = {"etcd": state_dir / "etcd.log", "kube-apiserver": state_dir / "kube-apiserver.log"}
    for log in logs.values():
        log.write_bytes(b"")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    pids: dict[str, int] = {}
    # Saved after each spawn, so that `down` from another process can stop a
    # start that died half way.
    state: dict[str, Any] = {"state_dir": str(state_dir), "pids": pids}

    def record(name: str, proc: subprocess.Popen[bytes]) -> None:
        procs[name] = proc
        pids[name] = proc.pid
        _save_state(state_dir, state)

    try:
        record(
            "etcd",
            _spawn(
                [
                    str(paths["etcd"]),
                    "--name=npuswarm-test",
                    f"--data-dir={etcd_data}",
                    f"--listen-client-urls={etcd_url}",
                    f"--advertise-client-urls={etcd_url}",
                    f"--listen-peer-urls={peer_url}",
                    f"--initial-advertise-peer-urls={peer_url}",
                    f"--initial-cluster=npuswarm-test={peer_url}",
                    "--initial-cluster-state=new",
                    # Test data is thrown away; fsync only costs time.
                    "--unsafe-no-fsync",
                    "--log-level=warn",
                ],
                logs["etcd"],
                die_with_parent,
            ),
        )
        _wait_until(
            "etcd /health",
            lambda: _healthy_etcd(etcd_url),
            deadline,
            procs,
            logs,
        )

        apiserver_argv = [
            str(paths["kube-apiserver"]),
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={apiserver_port}",
            # The apiserver writes a self-signed CA and serving cert here.
            f"--cert-dir={cert_dir}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={sa_pub}",
            f"--service-account-signing-key-file={sa_key}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            f"--token-auth-file={tokens}",
            "--authorization-mode=RBAC",
            "--allow-privileged=true",
            # Without a controller-manager no ServiceAccount exists, and this
            # plugin would reject every pod for want of "default".
            "--disable-admission-plugins=ServiceAccount",
            # The "kubernetes" Service would point at 127.0.0.1, which the
            # endpoint validation rejects (and retries forever in the log).
            "--endpoint-reconciler-type=none",
            "--profiling=false",
        ]
        record("kube-apiserver", _spawn(apiserver_argv, logs["kube-apiserver"], die_with_parent))

        ca_file = cert_dir / "apiserver.crt"
        _wait_until(
            "kube-apiserver /readyz",
            lambda: _ready_apiserver(server, ca_file, admin_token),
            deadline,
            procs,
            logs,
        )
    except ControlPlaneError as error:
        _stop_procs(state_dir, pids, procs, timeout=10)
        text = "\n".join(_tail(log, 200) for log in logs.values())
        if "address already in use" in text:
            raise _PortTakenError(str(error)) from error
        raise

    ca_pem = ca_file.read_bytes()
    kubeconfig = state_dir / "admin.kubeconfig"
    user_kubeconfig = state_dir / "user.kubeconfig"
    _write_private(kubeconfig, _kubeconfig(server, ca_pem, ADMIN_USER, admin_token))
    _write_private(user_kubeconfig, _kubeconfig(server, ca_pem, TEST_USER, user_token))

    plane = ControlPlane(
        state_dir=state_dir,
        server=server,
        kubeconfig=kubeconfig,
        user_kubeconfig=user_kubeconfig,
        admin_token=admin_token,
        user_token=user_token,
        user_name=TEST_USER,
        ca_file=ca_file,
        etcd_url=etcd_url,
        kubectl=paths["kubectl"],
        bin_dir=paths["etcd"].parent,
        k8s_version=k8s_version(),
        pids=dict(pids),
        apiserver_argv=apiserver_argv,
    )
    _save_state(state_dir, plane.to_json())
    _CHILDREN[state_dir] = procs
    return plane


# Popen objects of servers this process started, so that stop() reaps them
# rather than leaving zombies until the interpreter exits.
_CHILDREN: dict[Path, dict[str, subprocess.Popen[bytes]]] = {}


def _distinct_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _healthy_etcd(url: str) -> tuple[bool, str]:
    status, body = _get(f"{url}/health")
    return status == 200 and '"health":"true"' in body.replace(" ", ""), f"{status} {body}"


def _ready_apiserver(server: str, ca_file: Path, token: str) -> tuple[bool, str]:
    if not ca_file.exists():
        return False, f"{ca_file} not written yet"
    context = ssl.create_default_context(cafile=str(ca_file))
    status, body = _get(f"{server}/readyz", context=context, token=token)
    return status == 200 and body.strip() == "ok", f"{status} {body[-500:]}"


def _stop_procs(
    state_dir: Path,
    pids: dict[str, int],
    children: dict[str, subprocess.Popen[bytes]],
    timeout: float,
) -> None:
    # The apiserver first: stopping etcd under it only makes it log errors.
    order = sorted(pids, key=lambda name: name != "kube-apiserver")
    errors = []
    for name in order:
        try:
            _terminate(pids[name], name, state_dir, timeout, children.get(name))
        except ControlPlaneError as error:
            errors.append(str(error))
    if errors:
        raise ControlPlaneError("; ".join(errors))


def stop(target: ControlPlane | str | os.PathLike[str], *, timeout: float = 20.0) -> None:
    """Stop the processes recorded for a control plane; nothing else.

    Accepts a ControlPlane or its state dir, so a process other than the one
    that started it can stop it. Stopping twice is harmless.
    """
    state_dir = Path(target.state_dir if isinstance(target, ControlPlane) else target).resolve()
    state = _load_state(state_dir)
    children = _CHILDREN.pop(state_dir, {})
    _stop_procs(state_dir, state.get("pids", {}), children, timeout)


def stop_apiserver(plane: ControlPlane, *, timeout: float = 20.0) -> None:
    """Stop only kube-apiserver (etcd and its data stay): an API server outage."""
    children = _CHILDREN.get(plane.state_dir, {})
    _terminate(plane.pids["kube-apiserver"], "kube-apiserver", plane.state_dir, timeout,
               children.get("kube-apiserver"))


def start_apiserver(plane: ControlPlane, *, timeout: float = 90.0) -> None:
    """Start kube-apiserver again as it was started (same port, certificates and tokens);
    return once /readyz answers ok."""
    log = plane.state_dir / "kube-apiserver.log"
    proc = _spawn(plane.apiserver_argv, log, die_with_parent=True)
    plane.pids["kube-apiserver"] = proc.pid
    _CHILDREN.setdefault(plane.state_dir, {})["kube-apiserver"] = proc
    _save_state(plane.state_dir, plane.to_json())
    _wait_until(
        "kube-apiserver /readyz after a restart",
        lambda: _ready_apiserver(plane.server, plane.ca_file, plane.admin_token),
        time.monotonic() + timeout,
        {"kube-apiserver": proc},
        {"kube-apiserver": log},
    )


def load(state_dir: str | os.PathLike[str]) -> ControlPlane:
    """The ControlPlane recorded in state_dir (started by any process)."""
    state_dir = Path(state_dir).resolve()
    data = _load_state(state_dir)
    if "server" not in data:
        raise ControlPlaneError(f"the control plane in {state_dir} never became ready")
    return ControlPlane.from_json(data)


def is_running(plane: ControlPlane) -> bool:
    return all(_proc_is_ours(pid, name, plane.state_dir) for name, pid in plane.pids.items())


@contextlib.contextmanager
def running(
    state_dir: str | os.PathLike[str] | None = None, *, timeout: float = 90.0
) -> Iterator[ControlPlane]:
    """Start a control plane for the duration of a with-block.

    A temporary state dir (state_dir=None) is removed afterwards; a given one
    is kept, logs included, for inspection.
    """
    temporary = state_dir is None
    directory = Path(
        tempfile.mkdtemp(prefix="npuswarm-controlplane-") if state_dir is None else state_dir
    )
    try:
        plane = start(directory, timeout=timeout)
        try:
            yield plane
        finally:
            stop(plane)
    finally:
        if temporary:
            shutil.rmtree(directory, ignore_errors=True)


# --- CLI -----------------------------------------------------------------------


def _default_dir() -> Path:
    return Path(
        os.environ.get("NPUSWARM_CONTROLPLANE_DIR")
        or Path(tempfile.gettempdir()) / "npuswarm-controlplane"
    )


def _exports(values: dict[str, str]) -> str:
    return "".join(f"export {key}={shlex.quote(value)}\n" for key, value in values.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="control-plane",
        description="Run a local etcd + kube-apiserver for tests.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start in the background; print shell exports")
    up.add_argument("--dir", type=Path, default=None, help="state dir (default: %(default)s)")
    up.add_argument("--timeout", type=float, default=90.0)
    down = sub.add_parser("down", help="stop what `up` started in --dir")
    down.add_argument("--dir", type=Path, default=None)
    env = sub.add_parser("env", help="print shell exports for --dir (or only the binaries)")
    env.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args(argv)
    state_dir = args.dir or _default_dir()

    try:
        if args.command == "up":
            plane = start(state_dir, timeout=args.timeout, die_with_parent=False)
            sys.stdout.write(_exports(plane.env()))
        elif args.command == "down":
            if not (Path(state_dir) / STATE_FILE).exists():
                print(f"control-plane: nothing recorded in {state_dir}", file=sys.stderr)
                return 0
            stop(state_dir)
        elif args.command == "env":
            if (Path(state_dir) / STATE_FILE).exists():
                sys.stdout.write(_exports(load(state_dir).env()))
            else:
                paths = binaries()
                sys.stdout.write(
                    _exports(
                        {
                            "NPUSWARM_KUBECTL": str(paths["kubectl"]),
                            "NPUSWARM_CONTROLPLANE_BIN": str(bin_dir()),
                        }
                    )
                )
    except ControlPlaneError as error:
        print(f"control-plane: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
