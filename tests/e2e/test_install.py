"""One `kubectl apply -k manifests/overlays/production` installs npuswarm on an empty cluster,
and the operator image, run with the production arguments and the shipped RBAC, creates its
peering object and records itself in it."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.helpers import stop_process, wait_for

from .conftest import (
    OPERATOR_NAMESPACE,
    REPO,
    DockerRelay,
    _answers,
    controlplane,
    free_port,
    operator_image,
    operatorimage,
)

pytestmark = pytest.mark.e2e


def test_production_overlay_installs_in_one_apply_and_the_operator_peers(tmp_path: Path) -> None:
    with controlplane.running(tmp_path / "controlplane") as plane:

        def kubectl(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([str(plane.kubectl), "--kubeconfig", str(plane.kubeconfig), *args],
                                  capture_output=True, text=True, timeout=120, check=False)

        applied = kubectl("apply", "-k", str(REPO / "manifests" / "overlays" / "production"))
        assert applied.returncode == 0, applied.stderr
        for name in ("crd/modeldeployments.npuswarm.io", "crd/clusterkopfpeerings.kopf.dev"):
            assert kubectl("wait", "--for=condition=Established", name, "--timeout=60s").returncode == 0
        for kind in ("deployment/npuswarm", "serviceaccount/npuswarm", "poddisruptionbudget/npuswarm"):
            assert kubectl("-n", OPERATOR_NAMESPACE, "get", kind).returncode == 0, kind
        # No peering object yet: the first operator pod makes it.
        assert kubectl("get", "clusterkopfpeering", "npuswarm").returncode != 0

        token = kubectl("-n", OPERATOR_NAMESPACE, "create", "token", "npuswarm", "--duration=1h")
        assert token.returncode == 0, token.stderr
        sa_dir = operatorimage.service_account_dir(tmp_path / "sa", token.stdout.strip(), plane.ca_file)
        relay = DockerRelay()
        relay.start()
        health = f"http://127.0.0.1:{free_port()}/healthz"
        name = f"npuswarm-install-{uuid.uuid4().hex[:8]}"
        argv = operatorimage.docker_run_args(
            operator_image(), name, plane.server, sa_dir,
            {"DOCKER_HOST": relay.url, "NPUSWARM_METRICS_PORT": str(free_port())},
            # The production Deployment's arguments (components/peering), priority fixed.
            ["run", f"--liveness={health}", "--log-format=json", "--peering-name=npuswarm", "--priority=7"],
        )
        log = tmp_path / "operator.log"
        with log.open("wb") as out:
            operator = subprocess.Popen(["docker", *argv], stdout=out, stderr=subprocess.STDOUT)
        try:
            def recorded() -> dict | None:
                got = kubectl("get", "clusterkopfpeering", "npuswarm", "-o", "json")
                if got.returncode != 0 or operator.poll() is not None:
                    return None
                peers = json.loads(got.stdout).get("status") or {}
                return peers or None

            peers = wait_for(recorded, "the operator's record in ClusterKopfPeering/npuswarm",
                             timeout=90)
            assert [p["priority"] for p in peers.values()] == [7], peers
            wait_for(lambda: _answers(health), "the operator's liveness endpoint", timeout=30)
        finally:
            stop_process(operator)
            subprocess.run(["docker", "rm", "--force", name], capture_output=True, check=False)
            relay.stop()
            print(log.read_text(errors="replace")[-3000:])
