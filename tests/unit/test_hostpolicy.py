"""Host safety: hostPath volumes only under the admin's allow-list, never the node's innards."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npuswarm import cli
from npuswarm.core.hostpolicy import DENIED_HOST_PATHS, denied_root, is_within, normalise_host_path
from npuswarm.core.hostpolicy import host_path_violation, violations
from npuswarm.settings import Settings

from .builders import deployment

DEFAULTS = Settings(allowed_host_paths=("/models", "/data"))


def volumes(*host_paths: str) -> list[dict[str, str]]:
    return [{"hostPath": p, "mountPath": f"/mnt/{i}"} for i, p in enumerate(host_paths)]


@pytest.mark.parametrize(
    "path",
    ["/models", "/models/", "/models/Qwen/Qwen3", "/data/cache", "//models//x/", "/models/./a"],
)
def test_paths_under_the_allow_list_pass(path: str) -> None:
    assert host_path_violation(path, DEFAULTS.allowed_host_paths) is None


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("/var/run/docker.sock", "/var/run and everything below it"),
        ("/run/docker.sock", "/run and everything below it"),
        ("/run/containerd/containerd.sock", "/run and everything below it"),
        ("/", "never allowed (/ would"),
        ("//", "never allowed (/ would"),
        ("/etc", "/etc and everything"),
        ("/etc/", "/etc and everything"),
        ("/proc/1/root", "/proc and"),
        ("/sys/fs/cgroup", "/sys and"),
        ("/dev/davinci0", "/dev and"),
        ("/root/.cache", "/root and"),
        ("/var/lib/docker/volumes", "/var/lib/docker and"),
        ("/models/../etc", "/models/../etc (= /etc) is never allowed"),
        ("/models/../../../etc/shadow", "(= /etc/shadow) is never allowed"),
        ("/data/x/../../var/run/docker.sock", "(= /var/run/docker.sock)"),
        ("/models/run/docker.sock", "is a socket path"),
        ("/modelsX", "outside the allowed host paths (/models, /data)"),
        ("/models-evil/x", "outside the allowed host paths"),
        ("/home/user", "outside the allowed host paths"),
        ("/models/../home", "(= /home) is outside"),
        ("relative/path", "not an absolute path"),
    ],
)
def test_refused_paths_say_why(path: str, fragment: str) -> None:
    problem = host_path_violation(path, DEFAULTS.allowed_host_paths)
    assert problem is not None and fragment in problem


def test_denied_paths_win_over_a_wider_allow_list() -> None:
    wide = Settings(allowed_host_paths=("/var", "/srv"))
    assert host_path_violation("/var/lib/models", wide.allowed_host_paths) is None
    for path in ("/var/run/docker.sock", "/var/lib/docker", "/var/lib/containerd/x"):
        problem = host_path_violation(path, wide.allowed_host_paths)
        assert problem is not None and "never allowed" in problem


def test_an_empty_allow_list_refuses_every_host_path() -> None:
    problem = host_path_violation("/models", ())
    assert problem is not None and "outside the allowed host paths (none)" in problem


def test_violations_name_each_offending_volume() -> None:
    md = deployment(volumes=volumes("/models", "/var/run/docker.sock", "/srv/x"))
    found = violations(md, DEFAULTS.tenant_policy())
    assert len(found) == 2
    assert found[0].startswith("spec.volumes[1]: hostPath /var/run/docker.sock is never allowed")
    assert found[1].startswith("spec.volumes[2]: hostPath /srv/x is outside")
    assert violations(deployment(volumes=volumes("/models/a", "/data")), DEFAULTS.tenant_policy()) == []
    assert violations(deployment(), DEFAULTS.tenant_policy()) == []


segments = st.sampled_from(["..", ".", "", "etc", "models", "data", "run", "var", "docker.sock", "x"])


@settings(max_examples=500, deadline=None)
@given(st.lists(segments, min_size=0, max_size=8))
def test_no_spelling_of_a_path_reaches_outside_the_allow_list(parts: list[str]) -> None:
    """Whatever the ``..``, ``.`` and ``//`` games, an accepted path normalises to one below an
    allowed root and outside every denied one (checked by an independent resolver)."""
    path = "/" + "/".join(parts)
    resolved: list[str] = []
    for part in parts:
        if part == "..":
            if resolved:
                resolved.pop()
        elif part not in ("", "."):
            resolved.append(part)
    real = "/" + "/".join(resolved)
    assert normalise_host_path(path) == real
    if host_path_violation(path, DEFAULTS.allowed_host_paths) is None:
        assert any(is_within(real, root) for root in DEFAULTS.allowed_host_paths)
        assert denied_root(real) is None and not real.endswith(".sock")
    if any(is_within(real, d) for d in DENIED_HOST_PATHS if d != "/") or real == "/":
        assert host_path_violation(path, ("/",)) is not None


def test_plan_refuses_what_the_operator_would(tmp_path: pytest.TempPathFactory,
                                              capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    monkeypatch.delenv("NPUSWARM_ALLOWED_HOST_PATHS", raising=False)
    # An unreachable Docker: the refusal must come before any Swarm call.
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:9")
    body = {
        "apiVersion": "npuswarm.io/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "sock", "namespace": "team"},
        "spec": {"image": "img", "model": "/models/m",
                 "volumes": volumes("/var/run/docker.sock")},
    }
    path = tmp_path / "md.yaml"  # type: ignore[operator]
    path.write_text(yaml.safe_dump(body))
    assert cli.main(["plan", "-f", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("npuswarm: PolicyViolation: team/sock: spec.volumes[0]: hostPath "
                          "/var/run/docker.sock is never allowed")


def network_snapshot(*extra: dict[str, Any]) -> Any:
    from npuswarm.core.snapshot import snapshot_from_engine

    own = {"npuswarm.io/managed-by": "npuswarm"}
    networks = [
        {"Id": "n1", "Name": "team-a-net", "Scope": "swarm", "Labels": own | {"npuswarm.io/namespace": "team-a"}},
        {"Id": "n2", "Name": "legacy-net", "Scope": "swarm", "Labels": own},
        {"Id": "n3", "Name": "stack-net", "Scope": "swarm", "Labels": {"com.docker.stack.namespace": "s"}},
        {"Id": "n4", "Name": "host", "Scope": "local"},
        {"Id": "n5", "Name": "my-bridge", "Scope": "local"},
        {"Id": "n6", "Name": "my-ingress", "Scope": "swarm", "Ingress": True},
        *extra,
    ]
    service = {"ID": "s1", "Version": {"Index": 1}, "Spec": {
        "Name": "team-a-old-0", "Labels": own | {"npuswarm.io/owner-namespace": "team-a",
                                               "npuswarm.io/owner-name": "old"},
        "TaskTemplate": {"ContainerSpec": {}, "Networks": [{"Target": "n2"}]}}}
    return snapshot_from_engine([], [service], [], networks)


def test_a_namespace_joins_only_its_own_networks_unless_the_admin_shares_one() -> None:
    from npuswarm.core.hostpolicy import network_violation

    snapshot, policy = network_snapshot(), DEFAULTS.tenant_policy()
    assert network_violation("team-a", "team-a-net", snapshot, policy) is None
    taken = network_violation("team-b", "team-a-net", snapshot, policy)
    assert taken is not None and "belongs to namespace team-a" in taken
    assert "NPUSWARM_SHARED_NETWORKS=team-a-net=team-b" in taken
    # Made before networks had a namespace: the namespaces already on it keep it.
    assert network_violation("team-a", "legacy-net", snapshot, policy) is None
    assert "belongs to namespace team-a" in (network_violation("team-b", "legacy-net", snapshot, policy) or "")
    # Not npuswarm's: only where the admin shares it.
    assert "npuswarm did not create it" in (network_violation("team-a", "stack-net", snapshot, policy) or "")
    shared = Settings(shared_networks="stack-net=team-a|team-b,team-a-net=*").tenant_policy()
    assert network_violation("team-b", "stack-net", snapshot, shared) is None
    assert network_violation("team-c", "stack-net", snapshot, shared) is not None
    assert network_violation("team-z", "team-a-net", snapshot, shared) is None


def test_network_must_be_swarm_scoped_or_missing_for_npuswarm_to_create() -> None:
    from npuswarm.core.hostpolicy import network_violation

    snapshot, policy = network_snapshot(), DEFAULTS.tenant_policy()
    # Docker would read an unknown name as an id prefix ("efd" can be the host network), but
    # the pass creates an overlay network of exactly that name before any service uses it.
    assert network_violation("team-a", "efd", snapshot, policy) is None
    # ... for the namespace that asked first in this pass; another one waits its turn.
    claimed = network_violation("team-b", "efd", snapshot, policy, {"efd": "team-a"})
    assert claimed is not None and "being created for namespace team-a" in claimed
    # A name that is a whole network id would select that network, created or not.
    host_id = "efd0123456789abcdefghijkl"
    by_id = network_violation("team-a", host_id, network_snapshot({"Id": host_id, "Name": "x"}), policy)
    assert by_id is not None and "is the id of an existing network" in by_id
    for name, kind in (("my-bridge", "local"), ("my-ingress", "ingress"), ("host", "local")):
        local = network_violation("team-a", name, snapshot, policy)
        assert local is not None and f"is a {kind} network" in local


def test_snapshot_records_network_scopes() -> None:
    from npuswarm.core.snapshot import snapshot_from_engine

    snapshot = snapshot_from_engine([], [], [], [
        {"Id": "a", "Name": "vllm-net", "Scope": "swarm"},
        {"Id": "b", "Name": "host", "Scope": "local"},
        {"Id": "c", "Name": "ingress", "Scope": "swarm", "Ingress": True},
    ])
    assert snapshot.networks == {"vllm-net": "swarm", "host": "local", "ingress": "ingress"}


# --- what tenants may ask beyond host paths (issue 24, items 3-5) -----------------------------


def test_host_paths_are_read_only_unless_the_root_allows_writes() -> None:
    from npuswarm.core.hostpolicy import TenantPolicy  # noqa: F401

    policy = Settings(allowed_host_paths=("/models", "/data:rw")).tenant_policy()
    writable = [{"hostPath": "/models/x", "mountPath": "/m", "readOnly": False},
                {"hostPath": "/data/cache", "mountPath": "/c", "readOnly": False}]
    (refused,) = violations(deployment(volumes=writable), policy)
    assert refused.startswith("spec.volumes[0]: hostPath /models/x may only be mounted read-only")
    assert "/models:rw" in refused
    assert violations(deployment(volumes=volumes("/models/x")), policy) == []  # read-only default
    assert deployment(volumes=volumes("/models/x")).spec.volumes[0].readOnly is True


@pytest.mark.parametrize(
    "name",
    ["ASCEND_RUNTIME_MOUNTS", "ASCEND_RUNTIME_OPTIONS", "ASCEND_ALLOW_LINK", "ASCEND_VNPU_SPECS",
     "MOUNT_BY_RUNTIME_FOR_DP", "host_snapshot_path", "DISABLE_UB_MOUNT", "LD_PRELOAD",
     "LD_LIBRARY_PATH", "LD_AUDIT", "GLIBC_TUNABLES", "GCONV_PATH"],
)
def test_env_the_runtime_or_the_loader_reads_is_refused_unless_allowed(name: str) -> None:
    md = deployment(engine={"env": {name: "x", "VLLM_USE_V1": "1"}})
    (refused,) = violations(md, DEFAULTS.tenant_policy())
    assert refused.startswith(f"spec.engine.env: {name} is reserved")
    allowed = Settings(allowed_reserved_env=name).tenant_policy()
    assert violations(md, allowed) == []


def test_the_placements_env_can_never_be_allowed() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="set from the placement"):
        Settings(allowed_reserved_env="ASCEND_VISIBLE_DEVICES")
    with pytest.raises(ValidationError, match="not reserved"):
        Settings(allowed_reserved_env="HF_HOME")


def test_images_outside_the_admins_patterns_are_refused() -> None:
    policy = Settings(allowed_images="quay.io/ascend/vllm-ascend:*, registry.local/ai/*").tenant_policy()
    assert violations(deployment(image="quay.io/ascend/vllm-ascend:v0.9.2rc1"), policy) == []
    assert violations(deployment(image="registry.local/ai/team-a/vllm:1"), policy) == []
    (refused,) = violations(deployment(image="docker.io/evil/vllm:latest"), policy)
    assert "is not an allowed image" in refused and "NPUSWARM_ALLOWED_IMAGES" in refused
    assert violations(deployment(image="anything:1"), DEFAULTS.tenant_policy()) == []  # empty: any


def test_multi_node_replicas_need_the_admins_host_network_grant() -> None:
    group = deployment("ds", namespace="team-a", nodesPerReplica=2)
    refused = violations(group, Settings().tenant_policy())
    assert refused == [
        "spec.nodesPerReplica: a multi-node replica runs on the host network; the cluster admin "
        "allows it per namespace with NPUSWARM_HOST_NETWORK_NAMESPACES"
    ]
    assert violations(group, Settings(host_network_namespaces="team-b,team-a").tenant_policy()) == []
    assert violations(group, Settings(host_network_namespaces="*").tenant_policy()) == []
    assert violations(deployment("one", namespace="team-a"), Settings().tenant_policy()) == []
