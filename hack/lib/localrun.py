"""Running things on this machine, for hack/, bench/ and tests/: the one wait helper, free
ports, stopping a child process, and the operator's command line. Standard library only.

    from localrun import free_port, operator_command, stop_process, wait_for
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

T = TypeVar("T")


class ToolError(RuntimeError):
    """A local tool cannot do what was asked, or a wait ran out; the message says what to do.
    Never "not yet" (swarmlab calls it LabError)."""


def wait_for(
    condition: Callable[[], T],
    what: str,
    timeout: float = 60.0,
    interval: float = 0.2,
    retry: tuple[type[Exception], ...] = (Exception,),
) -> T:
    """Poll `condition` until it returns something truthy, and return that; raise ToolError
    naming `what` at the deadline. An exception of a `retry` type means "not yet" (ToolError
    always means "never"); others propagate. The one wait helper of hack/, bench/ and tests/
    (tests/helpers.py turns the timeout into a test failure)."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    last: object = None
    while True:
        try:
            last = condition()
            if last:
                return last  # type: ignore[return-value]
        except ToolError:
            raise
        except retry as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error else f" (last: {last!r})"
            raise ToolError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)  # poll interval; the deadline above bounds the wait


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (not necessarily when a server binds it: a
    server that loses that race is started again on another)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def stop_process(proc: subprocess.Popen[bytes] | subprocess.Popen[str], grace: float = 20) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; reaped either way. Harmless when the
    process has already exited."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def operator_command(health_url: str) -> list[str]:
    """The checked-out operator (`npuswarm run --standalone`, JSON logs) in this Python."""
    return [
        sys.executable,
        "-m",
        "npuswarm.cli",
        "run",
        "--standalone",
        "--log-format",
        "json",
        f"--liveness={health_url}",
    ]


def operator_env(
    kubeconfig: str, docker_host: str, metrics_port: int, settings: Mapping[str, str] = {}
) -> dict[str, str]:
    """This environment without any NPUSWARM_* or DOCKER_* variable, plus the operator's
    kubeconfig, Docker endpoint, metrics port and ``settings`` (NPUSWARM_* values)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NPUSWARM_", "DOCKER_"))}
    return env | {
        "KUBECONFIG": kubeconfig,
        "DOCKER_HOST": docker_host,
        "NPUSWARM_METRICS_PORT": str(metrics_port),
        **settings,
    }
