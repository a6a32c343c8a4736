"""Multi-node replicas at `kubectl apply` (issue 20): the real API server refuses a group whose
data-parallel size, tensor-parallel size and NPUs per node disagree, naming the mismatch, and
takes the shapes the models take. Only the CRD is installed: no operator is needed to refuse.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import controlplane
from npuswarm.api.deployment import ModelDeployment

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
BASE: dict[str, Any] = {"image": "npuswarm/fake-vllm:dev", "model": "/models/m"}


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[controlplane.ControlPlane]:
    try:
        controlplane.binaries()
    except controlplane.BinariesMissingError as error:
        pytest.fail(str(error), pytrace=False)
    with controlplane.running(tmp_path_factory.mktemp("mn") / "controlplane") as running:
        kubectl(running, "apply", "-f", str(REPO / "crds" / "modeldeployments.npuswarm.io.yaml"))
        kubectl(running, "wait", "--for=condition=Established",
                "crd/modeldeployments.npuswarm.io", "--timeout=60s")
        yield running


def kubectl(plane: controlplane.ControlPlane, *args: str, input: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [str(plane.kubectl), "--kubeconfig", str(plane.kubeconfig), *args]
    result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)}: {result.stderr}{result.stdout}")
    return result


def apply(plane: controlplane.ControlPlane, spec: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    body = {"apiVersion": "npuswarm.io/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "group", "namespace": "default"}, "spec": {**BASE, **spec}}
    return kubectl(plane, "apply", "--dry-run=server", "-f", "-", input=json.dumps(body), check=False)


def models_accept(spec: dict[str, Any]) -> bool:
    try:
        ModelDeployment.model_validate({"metadata": {"name": "group", "namespace": "default"},
                                        "spec": {**BASE, **spec}})
    except ValidationError:
        return False
    return True


REFUSED = [
    ({"nodesPerReplica": 4, "engine": {"dataParallelSize": 6}},
     "engine.dataParallelSize must be a multiple of nodesPerReplica"),
    ({"nodesPerReplica": 2, "npusPerReplica": 8,
      "engine": {"tensorParallelSize": 4, "dataParallelSize": 8}},
     "npusPerReplica (NPUs on each node) must equal engine.dataParallelSize / nodesPerReplica "
     "x engine.tensorParallelSize"),
    ({"nodesPerReplica": 2, "mode": "PerNode"}, "nodesPerReplica > 1 needs mode=Replicated"),
    ({"nodesPerReplica": 2, "network": {"name": "vllm-net"}},
     "a multi-node replica runs on the host network"),
    ({"nodesPerReplica": 2, "engine": {"extraArgs": ["--data-parallel-start-rank=1"]}},
     "extraArgs must not set data-parallel flags"),
]
ACCEPTED = [
    {"nodesPerReplica": 2, "npusPerReplica": 8,
     "engine": {"tensorParallelSize": 4, "dataParallelSize": 4}},
    {"nodesPerReplica": 4, "npusPerReplica": 8, "engine": {"tensorParallelSize": 4},
     "groupTopologyKey": "npuswarm.io/switch"},
    {"nodesPerReplica": 2, "npusPerReplica": 4, "npuIds": [0, 1, 2, 3]},
    # One node keeps its own DP flags, as before groups existed.
    {"engine": {"extraArgs": ["--data-parallel-size", "2"]}, "npusPerReplica": 2},
]


@pytest.mark.parametrize(("spec", "message"), REFUSED)
def test_kubectl_apply_refuses_a_mismatched_group_naming_the_mismatch(
    plane: controlplane.ControlPlane, spec: dict[str, Any], message: str
) -> None:
    result = apply(plane, spec)
    assert result.returncode != 0, result.stdout
    assert message in result.stderr, result.stderr
    assert not models_accept(spec)


@pytest.mark.parametrize("spec", ACCEPTED)
def test_kubectl_apply_takes_consistent_groups_as_the_models_do(
    plane: controlplane.ControlPlane, spec: dict[str, Any]
) -> None:
    result = apply(plane, spec)
    assert result.returncode == 0, result.stderr
    assert models_accept(spec)


GROUP_FIELDS = st.fixed_dictionaries({}, optional={
    "nodesPerReplica": st.sampled_from([1, 2, 3, 4]),
    "npusPerReplica": st.sampled_from([1, 2, 4, 8]),
    "mode": st.sampled_from(["Replicated", "PerNode"]),
    "network": st.just({"name": "vllm-net"}),
    "publish": st.just({"port": 18000}),
    "groupTopologyKey": st.sampled_from(["npuswarm.io/switch", "rack", "a b"]),
    "engine": st.fixed_dictionaries({}, optional={
        "tensorParallelSize": st.sampled_from([1, 2, 4, 8]),
        "dataParallelSize": st.sampled_from([1, 2, 3, 4, 6, 8, 16]),
        "extraArgs": st.lists(st.sampled_from(["--headless", "--data_parallel_size=2", "-dpa",
                                               "--seed", "1", "--data-parallel-hybrid-lb"]),
                              max_size=2),
    }),
})


def test_the_api_server_and_the_models_agree_on_random_group_shapes(
    plane: controlplane.ControlPlane,
) -> None:
    disagreements: list[str] = []
    tally = {"accepted": 0, "refused": 0}

    @settings(max_examples=60, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(GROUP_FIELDS)
    def check(spec: dict[str, Any]) -> None:
        server = apply(plane, spec).returncode == 0
        models = models_accept(spec)
        tally["accepted" if models else "refused"] += 1
        if server != models:
            disagreements.append(f"server {'accepts' if server else 'refuses'}: {json.dumps(spec)}")

    check()
    print(f"\ngroup shapes: {tally}")
    assert disagreements == [], "\n".join(disagreements[:10])
    assert tally["accepted"] and tally["refused"]


GROUP_STATUSES = sorted((REPO / "manifests" / "argocd" / "testdata").glob("group-*.yaml"))


@pytest.mark.parametrize("path", GROUP_STATUSES, ids=[p.name for p in GROUP_STATUSES])
def test_a_group_status_as_the_pass_writes_it_is_kept_whole_by_the_api_server(
    plane: controlplane.ControlPlane, path: Path
) -> None:
    """The status subresource prunes what the CRD's schema does not name: every field of a
    group's status (groupStatuses, their members) must come back as written."""
    import yaml

    obj = yaml.safe_load(path.read_text())
    name = obj["metadata"]["name"]
    body = {"apiVersion": obj["apiVersion"], "kind": obj["kind"],
            "metadata": {"name": name, "namespace": "default"}, "spec": obj["spec"]}
    kubectl(plane, "apply", "-f", "-", input=json.dumps(body))
    try:
        kubectl(plane, "patch", "modeldeployment", name, "-n", "default", "--subresource=status",
                "--type=merge", "-p", json.dumps({"status": obj["status"]}))
        stored = json.loads(kubectl(plane, "get", "modeldeployment", name, "-n", "default",
                                    "-o", "json").stdout)
        assert stored["status"] == obj["status"]
        assert stored["status"]["groupStatuses"][0]["members"][0]["replica"] == "0-m0"
    finally:
        kubectl(plane, "delete", "modeldeployment", name, "-n", "default", "--wait=false")
