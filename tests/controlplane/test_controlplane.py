"""The local control plane behaves like the cluster the e2e tests assume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import controlplane

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "hack" / "control-plane"

CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.controlplane-test.npuswarm.io
spec:
  group: controlplane-test.npuswarm.io
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              properties:
                size: {type: integer}
"""

WIDGET = """
apiVersion: controlplane-test.npuswarm.io/v1
kind: Widget
metadata: {name: w1, namespace: default}
spec: {size: 3}
"""

PRIVILEGED_POD = """
apiVersion: v1
kind: Pod
metadata: {name: privileged, namespace: default}
spec:
  containers:
    - name: c
      image: example.invalid/none
      securityContext: {privileged: true}
"""


def _gone(name: str, pid: int, state_dir: Path) -> bool:
    return not controlplane._proc_is_ours(pid, name, state_dir)


def _wait_gone(plane: controlplane.ControlPlane, seconds: float = 10) -> list[str]:
    # stop() has already waited; this only guards against a reaper lagging.
    deadline = time.monotonic() + seconds
    while True:
        alive = [n for n, pid in plane.pids.items() if not _gone(n, pid, plane.state_dir)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


@pytest.mark.e2e
def test_readyz_through_kubectl(kubectl):
    assert kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"


@pytest.mark.e2e
def test_server_and_kubectl_report_the_built_version(kubectl, plane):
    result = kubectl("version", "-o", "json")
    versions = json.loads(result.stdout)
    assert versions["serverVersion"]["gitVersion"] == plane.k8s_version
    assert versions["clientVersion"]["gitVersion"] == plane.k8s_version
    # kubectl warns on stderr when the versions are skewed or unknown.
    assert "WARNING" not in result.stderr


@pytest.mark.e2e
def test_crd_becomes_established_and_serves_objects(kubectl):
    kubectl("apply", "-f", "-", input=CRD)
    kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/widgets.controlplane-test.npuswarm.io",
    )
    kubectl("apply", "-f", "-", input=WIDGET)
    widget = json.loads(
        kubectl(
            "get", "widgets.controlplane-test.npuswarm.io", "w1", "-n", "default", "-o", "json"
        ).stdout
    )
    assert widget["spec"] == {"size": 3}


@pytest.mark.e2e
def test_unprivileged_user_is_authenticated_but_forbidden(kubectl, plane):
    whoami = json.loads(
        kubectl("auth", "whoami", "-o", "json", kubeconfig=plane.user_kubeconfig).stdout
    )
    assert whoami["status"]["userInfo"]["username"] == controlplane.TEST_USER

    can_i = kubectl("auth", "can-i", "list", "pods", kubeconfig=plane.user_kubeconfig, check=False)
    assert (can_i.returncode, can_i.stdout.strip()) == (1, "no")

    listing = kubectl("get", "pods", "-n", "default", kubeconfig=plane.user_kubeconfig, check=False)
    assert listing.returncode != 0
    assert "forbidden" in listing.stderr.lower()

    assert kubectl("auth", "can-i", "list", "pods").stdout.strip() == "yes"


@pytest.mark.e2e
def test_privileged_pod_is_admitted_without_a_service_account(kubectl):
    # No controller-manager means no "default" ServiceAccount; the pod is
    # still accepted because the ServiceAccount admission plugin is off.
    missing = kubectl("get", "serviceaccount", "default", "-n", "default", check=False)
    assert missing.returncode != 0 and "NotFound" in missing.stderr
    kubectl("apply", "-f", "-", input=PRIVILEGED_POD)
    kubectl("delete", "pod", "privileged", "-n", "default", "--wait=false")


@pytest.mark.e2e
def test_context_manager_stops_its_processes_and_removes_temp_state(binaries):
    with controlplane.running() as plane:
        assert controlplane.is_running(plane)
        state_dir = plane.state_dir
    assert _wait_gone(plane) == []
    assert not state_dir.exists()


@pytest.mark.e2e
def test_cli_up_env_down_from_separate_processes(binaries, tmp_path):
    state_dir = tmp_path / "cp"
    up = subprocess.run(
        [sys.executable, str(SCRIPT), "up", "--dir", str(state_dir)],
        check=False,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert up.returncode == 0, up.stderr
    try:
        env = subprocess.run(
            [sys.executable, str(SCRIPT), "env", "--dir", str(state_dir)],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert env.stdout == up.stdout
        assert f"export KUBECONFIG={state_dir / 'admin.kubeconfig'}" in env.stdout

        plane = controlplane.load(state_dir)
        assert controlplane.is_running(plane)
        ready = subprocess.run(
            [str(plane.kubectl), "get", "--raw", "/readyz"],
            env={**os.environ, "KUBECONFIG": str(plane.kubeconfig)},
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ready.stdout.strip() == "ok", ready.stderr
    finally:
        down = subprocess.run(
            [sys.executable, str(SCRIPT), "down", "--dir", str(state_dir)],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert down.returncode == 0, down.stderr
    assert _wait_gone(plane) == []
    # Logs stay behind in a given state dir for post-mortems.
    assert (state_dir / "kube-apiserver.log").exists()


def test_stop_never_signals_a_process_it_did_not_start(tmp_path):
    # A recorded pid may have been recycled; a process whose command line is
    # not our binary with our state dir must survive `down`.
    stranger = subprocess.Popen(["sleep", "300"])
    try:
        (tmp_path / controlplane.STATE_FILE).write_text(
            json.dumps(
                {
                    "state_dir": str(tmp_path),
                    "pids": {"kube-apiserver": stranger.pid, "etcd": stranger.pid},
                }
            )
        )
        controlplane.stop(tmp_path, timeout=1)
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_missing_binaries_fail_with_build_instructions(monkeypatch, tmp_path):
    monkeypatch.setenv("NPUSWARM_CONTROLPLANE_BIN", str(tmp_path))
    with pytest.raises(controlplane.BinariesMissingError, match="build-controlplane"):
        controlplane.start(tmp_path / "state")
    assert not (tmp_path / "state").exists()


@pytest.mark.e2e
def test_build_script_reuses_built_binaries(binaries, monkeypatch):
    # The script knows nothing of the Python-side override.
    monkeypatch.delenv("NPUSWARM_CONTROLPLANE_BIN", raising=False)
    result = subprocess.run(
        [str(REPO / "hack" / "build-controlplane")],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "reusing" in result.stderr
    assert result.stdout.strip() == str(controlplane.bin_dir())
