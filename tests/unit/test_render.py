from __future__ import annotations

from npuswarm.core.placement import Assignment
from npuswarm.core.render import essential, render_service, service_name, spec_hash

from .builders import deployment


def assignment(npus: set[int], slot: str = "0", node_id: str = "node-1") -> Assignment:
    return Assignment(deployment="default/qwen3", slot=slot, node_id=node_id, npus=frozenset(npus), kept=False)


def qwen3(**spec: object):  # type: ignore[no-untyped-def]
    base = {
        "servedModelName": "Qwen/Qwen3-30B-A3B",
        "engine": {
            "tensorParallelSize": 4,
            "enableExpertParallel": True,
            "maxModelLen": 32768,
            "port": 8001,
            "extraArgs": ["--trust-remote-code", "--gpu-memory-utilization", "0.9"],
            "env": {"PYTORCH_NPU_ALLOC_CONF": "max_split_size_mb:256"},
        },
        "volumes": [{"hostPath": "/models", "mountPath": "/models", "readOnly": True}],
        "shmSize": "2Gi",
        "network": {"name": "vllm-net", "alias": "qwen3"},
    }
    base.update(spec)
    return deployment("qwen3", **base)


def test_one_service_pinned_to_its_node_with_host_npus_and_renumbered_ids() -> None:
    spec = render_service(qwen3(), assignment({4, 5, 6, 7}, node_id="abc"))
    template = spec["TaskTemplate"]
    assert template["Placement"]["Constraints"] == ["node.id==abc"]
    env = template["ContainerSpec"]["Env"]
    assert "ASCEND_VISIBLE_DEVICES=4,5,6,7" in env
    assert "ASCEND_RT_VISIBLE_DEVICES=0,1,2,3" in env
    assert "PYTORCH_NPU_ALLOC_CONF=max_split_size_mb:256" in env
    assert spec["Mode"] == {"Replicated": {"Replicas": 1}}


def test_vllm_command_is_an_argument_list() -> None:
    container = render_service(qwen3(), assignment({0, 1, 2, 3}))["TaskTemplate"]["ContainerSpec"]
    assert container["Command"] == ["vllm"]
    assert container["Args"] == [
        "serve", "/models/qwen3",
        "--served-model-name", "Qwen/Qwen3-30B-A3B",
        "--tensor-parallel-size", "4",
        "--host", "0.0.0.0",
        "--port", "8001",
        "--enable-expert-parallel",
        "--max-model-len", "32768",
        "--trust-remote-code", "--gpu-memory-utilization", "0.9",
    ]  # fmt: skip


def test_shm_init_restart_health_and_network() -> None:
    md = qwen3(restartPolicy={"condition": "on-failure", "maxAttempts": 3, "delaySeconds": 5},
               healthCheck={"path": "/health", "startPeriodSeconds": 900})
    spec = render_service(md, assignment({0, 1, 2, 3}))
    container = spec["TaskTemplate"]["ContainerSpec"]
    shm = [m for m in container["Mounts"] if m["Target"] == "/dev/shm"]
    assert shm == [{"Type": "tmpfs", "Target": "/dev/shm", "TmpfsOptions": {"SizeBytes": 2 * 2**30}}]
    assert {"Type": "bind", "Source": "/models", "Target": "/models", "ReadOnly": True} in container["Mounts"]
    assert container["Init"] is True
    assert container["Healthcheck"]["StartPeriod"] == 900 * 10**9
    assert "http://127.0.0.1:8001/health" in container["Healthcheck"]["Test"][-1]
    assert spec["TaskTemplate"]["RestartPolicy"] == {"Condition": "on-failure", "Delay": 5 * 10**9, "MaxAttempts": 3}
    assert spec["TaskTemplate"]["Networks"] == [{"Target": "vllm-net", "Aliases": ["qwen3"]}]
    assert "Networks" not in spec  # the deprecated top-level field
    assert spec["EndpointSpec"] == {"Mode": "dnsrr"}


def test_labels_record_owner_replica_node_npus_and_hash() -> None:
    spec = render_service(qwen3(), assignment({0, 1, 2, 3}, slot="1", node_id="abc"))
    labels = spec["Labels"]
    assert labels["npuswarm.io/managed-by"] == "npuswarm"
    assert labels["npuswarm.io/owner-namespace"] == "default"
    assert labels["npuswarm.io/owner-name"] == "qwen3"
    assert labels["npuswarm.io/owner-uid"] == "uid-qwen3"
    assert labels["npuswarm.io/replica"] == "1"
    assert labels["npuswarm.io/node"] == "abc"
    assert labels["npuswarm.io/npus"] == "0,1,2,3"
    assert labels["npuswarm.io/spec-hash"] == spec_hash(spec)
    assert spec["TaskTemplate"]["ContainerSpec"]["Labels"]["npuswarm.io/spec-hash"] == spec_hash(spec)


def test_hash_changes_with_the_spec_and_not_with_list_order() -> None:
    a = render_service(qwen3(), assignment({0, 1, 2, 3}))
    b = render_service(qwen3(image="vllm-ascend:other"), assignment({0, 1, 2, 3}))
    assert spec_hash(a) != spec_hash(b)
    reordered = dict(a, TaskTemplate=dict(a["TaskTemplate"]))
    container = dict(a["TaskTemplate"]["ContainerSpec"])
    container["Env"] = list(reversed(container["Env"]))
    reordered["TaskTemplate"]["ContainerSpec"] = container
    assert essential(reordered) == essential(a)


def test_published_port() -> None:
    spec = render_service(qwen3(publish={"port": 18001, "mode": "host"}), assignment({0, 1, 2, 3}))
    assert spec["EndpointSpec"]["Ports"] == [
        {"Protocol": "tcp", "TargetPort": 8001, "PublishedPort": 18001, "PublishMode": "host"}
    ]


def test_long_names_fit_swarm() -> None:
    md = deployment("m" * 60, namespace="team-with-a-long-namespace")
    name = service_name(md, "0")
    assert len(name) <= 63
    assert name != service_name(deployment("m" * 59 + "n", namespace="team-with-a-long-namespace"), "0")


def test_the_stop_grace_period_is_set_but_never_compared() -> None:
    from npuswarm.core.render import DEFAULT_STOP_GRACE_SECONDS, Renderer
    from npuswarm.core.placement import Assignment

    md = deployment("graceful")
    where = Assignment(deployment=md.key, slot="0", node_id="n1", npus=frozenset({0}), kept=False)
    default = render_service(md, where)
    container = default["TaskTemplate"]["ContainerSpec"]
    assert container["StopGracePeriod"] == int(DEFAULT_STOP_GRACE_SECONDS * 1e9)
    shorter = Renderer(stop_grace_seconds=30).render(md, where)
    assert shorter["TaskTemplate"]["ContainerSpec"]["StopGracePeriod"] == 30 * 10**9
    # Not in the comparison nor the hash: a new setting rewrites (restarts) no replica.
    assert essential(shorter) == essential(default) and spec_hash(shorter) == spec_hash(default)
