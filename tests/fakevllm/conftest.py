"""Runs hack/fakevllm/server.py as a local process (no Docker) with a stand-in /dev."""

import json
import subprocess
import sys
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


@dataclass
class FakeServer:
    proc: subprocess.Popen
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, path: str, body=None) -> Response:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return Response(resp.status, dict(resp.headers), resp.read())
        except urllib.error.HTTPError as exc:
            return Response(exc.code, dict(exc.headers), exc.read())

    def wait_exit(self, timeout: float = 10.0) -> tuple[int, str]:
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err


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
    """start_server(args, npus=[0], env={}) -> FakeServer; the process is killed afterwards."""
    procs = []

    def start(args=(), npus=(0,), env=None, wait=True) -> FakeServer:
        dev = make_dev_dir(tmp_path / "dev", npus)
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
            cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        procs.append(proc)
        if wait:
            wait_listening(proc, port)
        return FakeServer(proc, port)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
