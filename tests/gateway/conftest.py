"""The gateway front with a real vllm-router and fake vLLM servers, as local processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from npuswarm.gateway.backends import GatewayReplica
from npuswarm.gateway.credentials import Credentials, GatewayIdentity, write_secret_files
from npuswarm.gateway.push import PushTarget, Signer, admin_request
from tests.fakevllm.conftest import SERVER, make_dev_dir, wait_listening
from tests.helpers import free_port, stop_process, wait_for
from tests.unit.builders import NOW

ROOT_KEY = "gateway-tests-root-key-0123456789"
CREDENTIALS = Credentials(ROOT_KEY, "default")
IDENTITY = GatewayIdentity("tests", "gw", "uid-1")
SIGNER = Signer()
START_DEADLINE = 30.0


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def npus(self) -> str:
        """Which fake replica answered: its ASCEND_VISIBLE_DEVICES."""
        return str(json.loads(self.headers["x-fake-vllm-npus"])["ASCEND_VISIBLE_DEVICES"])


def call(
    url: str, body: Any = None, method: str | None = None, key: str | None = None
) -> Answer:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return Answer(response.status, _lower(response.headers), response.read())
    except urllib.error.HTTPError as error:
        return Answer(error.code, _lower(error.headers), error.read())


def _lower(headers: Any) -> dict[str, str]:
    """Header names are case-insensitive; vllm-router sends them lower-case."""
    return {key.lower(): value for key, value in headers.items()}


@dataclass
class Gateway:
    proc: subprocess.Popen[str]
    port: int
    admin_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def admin(
        self, method: str, path: str, body: Any = None, credential: bytes | None = None
    ) -> Answer:
        """A signed request over TLS, as the operator makes it (its own credential unless
        another is given)."""
        replica = GatewayReplica("local", "127.0.0.1", self.admin_port, "")
        target = PushTarget(replica, IDENTITY.hostname, credential or CREDENTIALS.credential(IDENTITY))
        data = b"" if body is None else json.dumps(body).encode()
        status, text = admin_request(target, CREDENTIALS.client_context(), SIGNER, method, path, data)
        return Answer(status, {}, text)

    def push(
        self,
        models: dict[str, list[str]],
        credential: bytes | None = None,
        access: dict[str, Any] | None = None,
        scale_from_zero: dict[str, Any] | None = None,
    ) -> Answer:
        state: dict[str, Any] = {"models": models}
        if access is not None:
            state["access"] = access
        if scale_from_zero is not None:
            state["scaleFromZero"] = scale_from_zero
        return self.admin("PUT", "/backends", state, credential)

    def backends(self) -> Any:
        return self.admin("GET", "/backends").json()

    def chat(self, model: str, **extra: Any) -> Answer:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
        return call(f"{self.url}/v1/chat/completions", body)


@pytest.fixture
def fake_vllm(tmp_path: Path) -> Iterator[Any]:
    """fake_vllm(model, npus="0", env={}) -> base URL of a fake vLLM serving ``model``."""
    procs: list[subprocess.Popen[str]] = []

    def start(model: str, npus: str = "0", env: dict[str, str] | None = None) -> str:
        dev = make_dev_dir(tmp_path / f"dev-{len(procs)}", [0])
        port = free_port()
        full_env = {
            "PATH": "/usr/bin:/bin",
            "FAKE_VLLM_DEV_DIR": str(dev),
            "ASCEND_VISIBLE_DEVICES": npus,
            **(env or {}),
        }
        proc = subprocess.Popen(
            [sys.executable, str(SERVER), "serve", f"org/{model}", "--served-model-name", model,
             "--port", str(port), "--host", "127.0.0.1"],
            env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        procs.append(proc)
        wait_listening(proc, port)
        return f"http://127.0.0.1:{port}"

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


class PortTaken(AssertionError):
    pass


@pytest.fixture
def make_gateway(tmp_path: Path) -> Iterator[Any]:
    """make_gateway(*extra_args) -> a started `npuswarm-gateway` with its vllm-router child,
    health-checking backends every second."""
    binary = Path(sys.executable).with_name("npuswarm-gateway")
    if not binary.exists():
        pytest.fail(f"{binary} is missing: pip install -e '.[test]'")
    secrets = tmp_path / "secrets"
    write_secret_files(secrets, CREDENTIALS, IDENTITY, NOW)
    started: list[tuple[subprocess.Popen[str], Any]] = []

    def start(*extra: str) -> Gateway:
        # free_port's ports are free when asked, not when bound: under xdist another worker's
        # server or outgoing connection may take one first; a gateway that lost that race is
        # started again on others.
        for _ in range(3):
            try:
                return start_once(*extra)
            except PortTaken:
                continue
        return start_once(*extra)

    def start_once(*extra: str) -> Gateway:
        port, admin, router, metrics = (free_port() for _ in range(4))
        log_path = tmp_path / f"gateway-{len(started)}.log"
        log = log_path.open("w")
        proc = subprocess.Popen(
            [str(binary), "--port", str(port), "--admin-port", str(admin), "--router-port",
             str(router), "--metrics-port", str(metrics), "--health-interval", "1",
             "--health-failures", "1", "--sync-seconds", "1", "--policy", "round_robin",
             "--secrets-dir", str(secrets), *extra],
            env=dict(os.environ), stdout=log, stderr=log, text=True,
        )
        started.append((proc, log))
        made = Gateway(proc, port, admin)
        def healthy() -> bool:
            if proc.poll() is not None:
                text = log_path.read_text()
                raise (PortTaken if "address already in use" in text.lower() else AssertionError)(
                    text[-3000:])
            return _listening(port) and call(f"{made.url}/health").status == 200

        try:
            wait_for(healthy, "the gateway front's /health", timeout=START_DEADLINE, interval=0.1)
        except BaseException:
            print(log_path.read_text()[-3000:])
            raise
        return made

    yield start
    for proc, log in started:
        stop_process(proc, grace=10)
        log.close()


@pytest.fixture
def gateway(make_gateway: Any) -> Gateway:
    made: Gateway = make_gateway()
    return made


def _listening(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True
