"""The seed's stack file, imported, is placed by `npuswarm plan` as its author intended.

vllm-stack.yml hard-coded /dev/davinci0-3 for one model and /dev/davinci4-7 for the other;
Swarm ignored both. After import-stack, npuswarm must give each model 4 NPUs of its own on
every 8-NPU node, without writing anything to Swarm.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import docker
import pytest

from npuswarm import cli
from npuswarm.reconcile import Reconciler

from tests.helpers import SHARED_NETWORKS

from .conftest import model, serve, wait_for

pytestmark = pytest.mark.swarm


# The stack file the examples were made from: the migration example.
SEED_STACK = Path(__file__).resolve().parents[2] / "examples" / "vllm-stack.yml"


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 0, f"npuswarm {' '.join(argv)} exited {code}: {err}"
    return out


def npus_held(client: docker.APIClient) -> list[str]:
    """Services of any namespace that hold NPUs: other tests share this Swarm."""
    services = client.services(filters={"label": "npuswarm.io/managed-by=npuswarm"})
    return [s["Spec"]["Name"] for s in services]


def test_seed_stack_imports_into_two_models_placed_4_plus_4_without_writing(
    docker_client: docker.APIClient,
    namespace: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert SEED_STACK.is_file()
    run(["import-stack", str(SEED_STACK), "--namespace", namespace, "-o", str(tmp_path)], capsys)
    files = sorted(str(p) for p in tmp_path.glob("*.yaml"))
    assert [Path(f).name for f in files] == ["vllm-coder.yaml", "vllm-qwen3.yaml"]
    # As the import's check note says: npuswarm never mounts /root, `plan` refuses it...
    refused = cli.main(["plan", "-f", files[0]])
    assert refused == 2 and "hostPath /root/.cache is never allowed" in capsys.readouterr().err
    # ...so the cache moves under an allowed host path, as in examples/; the stack mounted
    # both writable, and npuswarm allows writes only where the admin says so: the weights
    # become read-only, and the admin allows writes under /data for the cache.
    for f in files:
        text = Path(f).read_text()
        assert "- hostPath: /root/.cache\n" in text
        text = text.replace("- hostPath: /root/.cache\n", "- hostPath: /data/vllm-cache\n")
        weights = "  - hostPath: /models\n    mountPath: /models\n    readOnly: false\n"
        assert weights in text
        Path(f).write_text(text.replace(weights, weights.replace("false", "true")))
    monkeypatch.setenv("NPUSWARM_ALLOWED_HOST_PATHS", "/models,/data:rw")
    monkeypatch.setenv("NPUSWARM_SHARED_NETWORKS", SHARED_NETWORKS)

    nodes = json.loads(run(["nodes", "-o", "json"], capsys))
    eight = [n for n in nodes if len(n["npus"]) == 8 and n["state"] == "ready"]
    assert eight, f"no ready node with 8 NPUs: {nodes} (hack/local-swarm up)"

    def plan_on_a_free_swarm() -> list[dict[str, Any]] | None:
        # Placement sees every NPU any npuswarm service holds; only a plan made while
        # no other test held NPUs shows the intended layout.
        if npus_held(docker_client):
            return None
        argv = ["plan", "-o", "json"] + [arg for f in files for arg in ("-f", f)]
        report: list[dict[str, Any]] = json.loads(run(argv, capsys))
        return None if npus_held(docker_client) else report

    report = wait_for(plan_on_a_free_swarm, "no other services holding NPUs", timeout=300)

    by_name = {item["deployment"]: item for item in report}
    assert sorted(by_name) == [f"{namespace}/vllm-coder", f"{namespace}/vllm-qwen3"]
    qwen3, coder = by_name[f"{namespace}/vllm-qwen3"], by_name[f"{namespace}/vllm-coder"]
    for node in eight:
        # mode: PerNode (the stack's `global`): one replica per node, slot = node id.
        mine = {d: next(r for r in by_name[d]["replicas"] if r["replica"] == node["id"])
                for d in by_name}  # fmt: skip
        qwen3_npus = set(mine[qwen3["deployment"]]["npus"])
        coder_npus = set(mine[coder["deployment"]]["npus"])
        assert len(qwen3_npus) == 4
        assert len(coder_npus) == 4
        assert not qwen3_npus & coder_npus
        assert qwen3_npus | coder_npus == set(node["npus"])
        assert all(mine[d]["unplaced"] is None for d in mine)
    for item in report:
        assert {a["action"] for a in item["actions"]} == {"create"}
        assert all(a["reason"] == "new replica" for a in item["actions"])

    # plan only looks: nothing of this namespace exists in Swarm.
    owned = docker_client.services(filters={"label": f"npuswarm.io/owner-namespace={namespace}"})
    assert owned == []


def test_a_network_name_that_prefixes_the_host_networks_id_never_reaches_the_host_network(
    docker_client: docker.APIClient, namespace: str, reconciler: Reconciler
) -> None:
    """Docker reads a service's network as an id, then a name, then an id prefix: alone, a
    name like the first letters of the host network's id attaches the replica to the node's
    network stack. The pass first creates an overlay network of exactly that name."""
    host = docker_client.networks(names=["host"])[0]["Id"]
    md = model(namespace, "sneaky", replicas=1, network={"name": host[:5]})
    try:
        serve(reconciler, md, [md], {})
        (created,) = docker_client.networks(names=[host[:5]])
        assert created["Id"] != host and created["Driver"] == "overlay"
        (service,) = docker_client.services(filters={"label": f"npuswarm.io/owner-namespace={namespace}"})
        targets = [n["Target"] for n in service["Spec"]["TaskTemplate"]["Networks"]]
        assert targets == [created["Id"]]
    finally:
        reconciler.finalize(namespace, "sneaky", md.metadata.uid)
        for network in docker_client.networks(names=[host[:5]]):
            docker_client.remove_network(network["Id"])
