"""Fixtures for the tests of the control plane tooling (hack/lib/controlplane.py).

These tests never skip: a missing build is a failure whose message says how
to build the binaries.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

import controlplane


@pytest.fixture(scope="session")
def binaries() -> dict[str, Path]:
    try:
        return controlplane.binaries()
    except controlplane.BinariesMissingError as error:
        message = str(error)
    # Outside the except block, so the report is the message alone rather
    # than two chained tracebacks.
    pytest.fail(message, pytrace=False)


@pytest.fixture(scope="session")
def plane(binaries, tmp_path_factory) -> controlplane.ControlPlane:
    # A kept state dir under pytest's tmp folder leaves the server logs
    # behind for a failed run to be read.
    state_dir = tmp_path_factory.mktemp("controlplane")
    with controlplane.running(state_dir) as cp:
        yield cp


@pytest.fixture
def kubectl(plane):
    """Run the matching kubectl as the admin (or as `kubeconfig=`)."""

    def run(
        *args: str,
        kubeconfig: Path | None = None,
        check: bool = True,
        input: str | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess:
        argv = [str(plane.kubectl), "--kubeconfig", str(kubeconfig or plane.kubeconfig), *args]
        result = subprocess.run(
            argv, check=False, capture_output=True, text=True, input=input, timeout=timeout
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    return run
