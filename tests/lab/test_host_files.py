"""Host files on the lab, through the real node agents (the operator's image on every node,
read over TLS with signed requests): a node lacking a model's files gets none of its replicas,
and a symbolic link a tenant makes inside a writable root that leads out of it is refused on
every node where it exists (issue 24's attack: `ln -s / <root>/x`, then another deployment
mounts `<root>/x`). The invariant checker runs on every turn.

The lab's nodes share this machine's filesystem: a node "lacks" files under a tmpfs mounted
over the root in its own mount namespace (Lab.mask_path), so its dockerd and its agent see an
empty directory there, as a node whose disk lacks them would."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import swarmlab
from npuswarm import cli
from npuswarm.api.deployment import ModelDeployment
from npuswarm.api.labels import OWNER_NAME
from npuswarm.core.pipeline import Desired
from npuswarm.gateway.credentials import Credentials
from npuswarm.nodehealth.runner import NodeChecker
from npuswarm.reconcile import PassResult, Reconciler
from npuswarm.settings import Settings
from npuswarm.swarm import Swarm
from tests.helpers import wait_for
from tests.invariants import npu_conflicts

from .conftest import ROOT_KEY

pytestmark = pytest.mark.lab


@pytest.fixture
def root() -> Iterator[Path]:
    """An allowed root, writable (so a tenant can make links in it), with one model."""
    with tempfile.TemporaryDirectory(prefix="npuswarm-files-") as made:
        path = Path(made)
        path.chmod(0o755)
        (path / "qwen-a").mkdir()
        (path / "qwen-a" / "model.safetensors").write_bytes(b"w" * 4096)
        yield path


@pytest.fixture
def settings(operator_image: str, root: Path) -> Settings:
    return Settings(
        root_key=ROOT_KEY,
        agent_image=operator_image,
        npu_health_seconds=1.0,
        node_recheck_failed_seconds=3.0,
        allowed_host_paths=(f"{root}:rw",),
    )


def model(name: str, replicas: int, spec: dict[str, Any], created: str) -> ModelDeployment:
    return ModelDeployment.model_validate(
        {
            "metadata": {"name": name, "namespace": "lab", "uid": f"uid-{name}",
                         "generation": 1, "creationTimestamp": created},
            "spec": {
                "image": swarmlab.IMAGE,
                "mode": "Replicated",
                "replicas": replicas,
                "npusPerReplica": 8,
                "healthCheck": {"startPeriodSeconds": 20, "intervalSeconds": 1,
                                "timeoutSeconds": 2},
                "restartPolicy": {"delaySeconds": 1},
                **spec,
            },
        }
    )


class Loops:
    """The operator's pass and node-check loop over several deployments, stepped by the test;
    every turn checks that no NPU is held twice."""

    def __init__(self, lab: swarmlab.Lab, settings: Settings) -> None:
        self.lab = lab
        self.swarm = Swarm(base_url=lab.endpoint)
        self.reconciler = Reconciler(self.swarm, settings)
        self.checker = NodeChecker(
            self.swarm, settings, lambda: self.reconciler.last_plan,
            Credentials(ROOT_KEY, settings.instance),
        )
        self.deployments: list[ModelDeployment] = []
        self.previous: dict[str, dict[str, Any]] = {}
        self.last: PassResult | None = None

    def turn(self) -> PassResult:
        self.checker.step()
        result = self.reconciler.run_pass(
            Desired(deployments=list(self.deployments), previous=dict(self.previous)),
            self.checker.unusable,
        )
        for key, view in result.views.items():
            self.previous[key] = view.status.model_dump(mode="json")
        self.last = result
        conflicts = npu_conflicts(self.lab.client(1).api)
        assert not conflicts, conflicts
        return result

    def until(self, check: Any, what: str, timeout: float = 120) -> PassResult:
        def done() -> PassResult | None:
            result = self.turn()
            return result if check(result) else None

        return wait_for(done, what, timeout=timeout, interval=0.5)

    def nodes_of(self, key: str) -> list[str]:
        assert self.last is not None
        return sorted(a.node_id for a in self.last.plan.placement.for_deployment(key))

    def close(self) -> None:
        self.checker.close()
        for md in self.deployments:
            self.reconciler.finalize(md.metadata.namespace, md.metadata.name, md.metadata.uid)
        self.reconciler.close()


def running(result: PassResult, key: str) -> int:
    return result.views[key].status.readyReplicas


def degraded(result: PassResult, key: str) -> tuple[str, str]:
    for condition in result.views[key].status.conditions:
        if condition.type == "Degraded" and condition.status == "True":
            return condition.reason, condition.message
    return "", ""


def mounts_anywhere(lab: swarmlab.Lab, source: str) -> list[str]:
    """Containers on any node with a bind mount of ``source`` (running or not)."""
    found = []
    for index in range(1, len(lab.nodes) + 1):
        api = lab.client(index).api
        for container in api.containers(all=True):
            for mount in container.get("Mounts") or []:
                if mount.get("Source") == source:
                    found.append(f"node{index}: {container['Names']}")
    return found


@pytest.mark.usefixtures("agents_removed")
def test_a_node_missing_a_models_files_gets_none_of_its_replicas(
    swarm_lab: swarmlab.Lab, settings: Settings, root: Path
) -> None:
    lacking = 2
    lacking_id, lacking_host = swarm_lab.node_id(lacking), swarm_lab.node(lacking).hostname
    swarm_lab.mask_path(lacking, str(root))
    loops = Loops(swarm_lab, settings)
    spec = {"model": "/weights/qwen-a",
            "volumes": [{"hostPath": str(root), "mountPath": "/weights"}]}
    md = model("files-a", 2, spec, "2026-12-01T00:00:00Z")
    loops.deployments = [md]
    try:
        # Best fit by hostname would take node1 and node2; node2 lacks the model.
        loops.until(lambda r: running(r, md.key) == 2, "both replicas ready")
        assert lacking_id not in loops.nodes_of(md.key)
        assert loops.checker.host_files()[lacking_id][f"{root}/qwen-a"].exists is False
        have = loops.checker.host_files()[swarm_lab.node_id(1)][f"{root}/qwen-a"]
        assert have.exists and have.size == 4096 and have.files == 1

        # A third replica: only the node without the files has room, so it waits, and the
        # status names the node and the path.
        md3 = model("files-a", 3, spec, "2026-12-01T00:00:00Z")
        loops.deployments = [md3]
        result = loops.until(lambda r: degraded(r, md.key)[0] == "HostFilesUnavailable",
                             "the third replica unplaced for lack of files")
        reason, message = degraded(result, md.key)
        assert f"model {root}/qwen-a missing on {lacking_host}" in message, message
        assert lacking_id not in loops.nodes_of(md.key)

        # `npuswarm nodes --validate --path` shows it per node.
        shown = cli_nodes(swarm_lab, settings, f"{root}/qwen-a")
        assert f"! {root}/qwen-a missing on {lacking_host}" in shown, shown
        assert f"files: {root}/qwen-a  1 files" in shown, shown
    finally:
        loops.close()
        swarm_lab.unmask_path(lacking, str(root))


def cli_nodes(lab: swarmlab.Lab, settings: Settings, path: str) -> str:
    import io
    from contextlib import redirect_stdout

    env = {"DOCKER_HOST": lab.endpoint, "NPUSWARM_ROOT_KEY": ROOT_KEY,
           "NPUSWARM_AGENT_PORT": str(settings.agent_port)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    out = io.StringIO()
    try:
        with redirect_stdout(out):
            cli.main(["nodes", "--validate", "--path", path])
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return out.getvalue()


@pytest.mark.usefixtures("agents_removed")
def test_a_tenants_link_out_of_an_allowed_root_is_refused_and_never_mounted(
    swarm_lab: swarmlab.Lab, settings: Settings, root: Path
) -> None:
    """Tenant A may write in the root; it makes `x -> /` there from inside its replica. Tenant
    B's deployment mounting `<root>/x` would get the node's / (Docker follows the link): it is
    refused on every node where the link is, and no container ever mounts it."""
    loops = Loops(swarm_lab, settings)
    writer = model("writer", 1, {
        "model": "/scratch/qwen-a",
        "volumes": [{"hostPath": str(root), "mountPath": "/scratch", "readOnly": False}],
    }, "2026-12-01T00:00:00Z")
    loops.deployments = [writer]
    escape = root / "x"
    try:
        loops.until(lambda r: running(r, writer.key) == 1, "the writer ready")
        container = wait_for(lambda: replica_container(swarm_lab, loops, writer.key),
                             "the writer's container", timeout=30)
        made = container.exec_run(["ln", "-s", "/", "/scratch/x"])
        assert made.exit_code == 0, made.output
        assert os.readlink(escape) == "/"

        victim = model("victim", 1, {
            "model": "/weights",
            "volumes": [{"hostPath": str(escape), "mountPath": "/weights"}],
        }, "2026-12-02T00:00:00Z")
        loops.deployments = [writer, victim]
        result = loops.until(lambda r: degraded(r, victim.key)[0] == "HostFilesUnavailable",
                             "the victim refused")
        _, message = degraded(result, victim.key)
        assert f"hostPath {escape} resolves to / on" in message, message
        assert f"outside its allowed root {root}" in message, message
        # A few more turns: still nothing of it anywhere.
        for _ in range(3):
            result = loops.turn()
        assert not loops.nodes_of(victim.key)
        assert not loops.reconciler.swarm.services_labelled(f"{OWNER_NAME}=victim")
        assert not mounts_anywhere(swarm_lab, str(escape))
        assert running(result, writer.key) == 1  # the writer is left alone
    finally:
        loops.close()
        if escape.is_symlink():
            escape.unlink()


def replica_container(lab: swarmlab.Lab, loops: Loops, key: str) -> Any:
    assert loops.last is not None
    for service in loops.last.plan.snapshot.services_of(key):
        for index in range(1, len(lab.nodes) + 1):
            found = lab.client(index).containers.list(
                filters={"label": f"com.docker.swarm.service.name={service.name}"})
            if found:
                return found[0]
    return None
