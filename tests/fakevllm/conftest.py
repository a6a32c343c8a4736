"""Runs hack/fakevllm/server.py as a local process (no Docker) with a stand-in /dev."""

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from localrun import free_port

SERVER = Path(__file__).resolve().parents[2] / "hack" / "fakevllm" / "server.py"
START_DEADLINE = 10.0


def make_dev_dir(path: Path, ids) -> Path:
    path.mkdir(exist_ok=True)
    for name in [f"davinci{i}" for i in ids] + ["davinci_manager", "devmm_svm", "hisi_hdc"]:
        (path / name).write_text("")
    return path


@dataclass
class Response:
    status: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)


class Stderr:
    """A process's stderr, read as it comes (so a test can wait for a line)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(proc.stderr,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        with stream:
            for line in stream:
                self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)


@dataclass
class FakeServer:
    proc: subprocess.Popen
    port: int
    stderr: Stderr

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, path: str, body=None, timeout: float = 10) -> Response:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return Response(resp.status, dict(resp.headers), resp.read())
        except urllib.error.HTTPError as exc:
            return Response(exc.code, dict(exc.headers), exc.read())

    def wait_exit(self, timeout: float = 10.0) -> tuple[int, str]:
        self.proc.wait(timeout=timeout)
        self.stderr.thread.join(timeout=timeout)
        return self.proc.returncode, self.stderr.text()


def wait_listening(proc: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + START_DEADLINE
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return  # exited: the test looks at the exit code and stderr
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)  # poll interval while the process binds its port
    raise AssertionError(f"fake vLLM did not listen on {port} within {START_DEADLINE}s")


@pytest.fixture
def start_server(tmp_path):
    """start_server(args, npus=[0], env={}) -> FakeServer; the process is killed afterwards.
    Each server sees its own devices. It is waited for until it listens, unless ``wait`` is
    False or it is a --headless member (which serves no API)."""
    procs = []

    def start(args=(), npus=(0,), env=None, wait=None) -> FakeServer:
        dev = make_dev_dir(tmp_path / f"dev{len(procs)}", npus)
        port = free_port()
        full_env = {"PATH": "/usr/bin:/bin", "FAKE_VLLM_DEV_DIR": str(dev), **(env or {})}
        cmd = [
            sys.executable,
            str(SERVER),
            "serve",
            *args,
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
        ]
        proc = subprocess.Popen(
            cmd, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        procs.append(proc)
        server = FakeServer(proc, port, Stderr(proc))
        if wait or (wait is None and "--headless" not in args):
            wait_listening(proc, port)
        return server

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
