"""import-stack: each compose -> ModelDeployment mapping rule, each error, and the CLI contract."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from npuswarm import cli
from npuswarm.cli import write_files
from npuswarm.stackfiles.compose import (
    Note,
    StackFileError,
    duration_ns,
    parse_compose,
    quantity,
    ram_bytes,
)
from npuswarm.stackfiles.importer import StackImport, import_stack

# The stack file the examples were made from: the migration example.
SEED_STACK = Path(__file__).resolve().parents[2] / "examples" / "vllm-stack.yml"

BASE: dict[str, Any] = {
    "image": "vllm-ascend:test",
    "entrypoint": ["vllm"],
    "command": "serve /models/m --tensor-parallel-size 4",
    "devices": [f"/dev/davinci{i}:/dev/davinci{i}" for i in range(4)],
}


def compose(name: str = "llm", **service: Any) -> dict[str, Any]:
    """A one-service stack: BASE with ``service`` merged over it (None removes a key)."""
    body = copy.deepcopy(BASE)
    for key, value in service.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return {"version": "3.8", "services": {name: body}, "networks": {"net": {"external": True}}}


def import_one(name: str = "llm", **service: Any) -> tuple[dict[str, Any], list[Note]]:
    result = import_stack(compose(name, **service), source="stack.yml", base_dir="/srv/stack")
    assert len(result.services) == 1
    imported = result.services[0]
    return imported.deployment.spec.model_dump(), list(imported.notes)


def at(data: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        data = data[part]
    return data


def notes_about(notes: list[Note], kind: str) -> str:
    return "\n".join(str(n) for n in notes if n.kind == kind)


# --- Mapping rules ----------------------------------------------------------------------------

MAPPINGS = [
    # vllm serve command: forms of entrypoint + command
    ("seed form", {"command": "serve /models/q --port 8001"}, "engine.port", 8001),
    ("list command", {"entrypoint": None, "command": ["vllm", "serve", "/m/x"]}, "model", "/m/x"),
    ("string entrypoint", {"entrypoint": "vllm serve", "command": ["/m/y"]}, "model", "/m/y"),
    ("vllm by path", {"entrypoint": ["/usr/local/bin/vllm"], "command": "serve /m/z"},
     "model", "/m/z"),
    ("--model flag", {"command": "serve --model /m/f -tp 4"}, "model", "/m/f"),
    ("shell wrapper", {"entrypoint": None, "command": ["sh", "-c", "exec vllm serve /m/s -tp 4"]},
     "model", "/m/s"),
    ("served name", {"command": "serve /m --served-model-name Q/Q3"}, "servedModelName", "Q/Q3"),
    ("served name =", {"command": "serve /m --served-model-name=Q/Q3"}, "servedModelName", "Q/Q3"),
    ("served names, first", {"command": "serve /m --served-model-name a b -tp 4"},
     "servedModelName", "a"),
    ("tp", {"command": "serve /m --tensor-parallel-size 4"}, "engine.tensorParallelSize", 4),
    ("tp =", {"command": "serve /m --tensor-parallel-size=4"}, "engine.tensorParallelSize", 4),
    ("-tp", {"command": "serve /m -tp 4"}, "engine.tensorParallelSize", 4),
    ("-tp=", {"command": "serve /m -tp=4"}, "engine.tensorParallelSize", 4),
    ("tp underscore", {"command": "serve /m --tensor_parallel_size 4"},
     "engine.tensorParallelSize", 4),
    ("tp absent", {"command": "serve /m"}, "engine.tensorParallelSize", 1),
    ("ep dash", {"command": "serve /m --enable-expert-parallel"},
     "engine.enableExpertParallel", True),
    ("ep underscore", {"command": "serve /m --enable_expert_parallel"},
     "engine.enableExpertParallel", True),
    ("ep off", {"command": "serve /m --no-enable-expert-parallel"},
     "engine.enableExpertParallel", False),
    ("max len", {"command": "serve /m --max-model-len 32768"}, "engine.maxModelLen", 32768),
    ("max len =", {"command": "serve /m --max-model-len=4096"}, "engine.maxModelLen", 4096),
    ("max len underscore", {"command": "serve /m --max_model_len 1024"},
     "engine.maxModelLen", 1024),
    ("port =", {"command": "serve /m --port=8002"}, "engine.port", 8002),
    ("port default", {"command": "serve /m"}, "engine.port", 8000),
    ("extra args kept in order",
     {"command": "serve /m --trust-remote-code --gpu-memory-utilization 0.9 -tp 4 --dtype=bf16"},
     "engine.extraArgs",
     ["--trust-remote-code", "--gpu-memory-utilization", "0.9", "--dtype=bf16"]),
    ("quoted arg stays one", {"command": "serve /m --chat-template '{{ x }}'"},
     "engine.extraArgs", ["--chat-template", "{{ x }}"]),
    ("--host dropped", {"command": "serve /m --host 127.0.0.1"}, "engine.extraArgs", []),
    # environment
    ("env list", {"environment": ["A=1", "B=x=y"]}, "engine.env", {"A": "1", "B": "x=y"}),
    ("env mapping", {"environment": {"A": 1, "B": True, "C": "c"}}, "engine.env",
     {"A": "1", "B": "true", "C": "c"}),
    ("env without value dropped", {"environment": ["A", "B=2"]}, "engine.env", {"B": "2"}),
    ("env owned dropped", {"environment": ["ASCEND_RT_VISIBLE_DEVICES=0,1", "B=2"]},
     "engine.env", {"B": "2"}),
    ("env $$ unescaped", {"environment": ["P=a$$b"]}, "engine.env", {"P": "a$b"}),
    # NPUs
    ("devices count", {}, "npusPerReplica", 4),
    ("devices with perms", {"devices": ["/dev/davinci0:/dev/davinci0:rwm"], "command": "serve /m"},
     "npusPerReplica", 1),
    ("devices eight", {"devices": [f"/dev/davinci{i}" for i in range(8)],
                       "command": "serve /m -tp 8"},
     "npusPerReplica", 8),
    ("devices duplicate once", {"devices": ["/dev/davinci3", "/dev/davinci3:/dev/davinci3",
                                            "/dev/davinci4"], "command": "serve /m -tp 2"},
     "npusPerReplica", 2),
    ("control devices ignored", {"devices": ["/dev/davinci_manager", "/dev/hisi_hdc",
                                             "/dev/devmm_svm", "/dev/davinci1"],
                                 "command": "serve /m"}, "npusPerReplica", 1),
    ("NPUs from env", {"devices": None, "environment": ["ASCEND_VISIBLE_DEVICES=0-1"],
                       "command": "serve /m -tp 2"}, "npusPerReplica", 2),
    ("no devices", {"devices": None}, "npusPerReplica", None),
    ("NPUs from env, not env", {"devices": None, "environment": ["ASCEND_VISIBLE_DEVICES=0-3"]},
     "engine.env", {}),
    # volumes
    ("short bind", {"volumes": ["/data:/data"]}, "volumes",
     [{"hostPath": "/data", "mountPath": "/data", "readOnly": False}]),
    ("short ro", {"volumes": ["/models:/models:ro"]}, "volumes",
     [{"hostPath": "/models", "mountPath": "/models", "readOnly": True}]),
    ("long bind",
     {"volumes": [{"type": "bind", "source": "/a", "target": "/b", "read_only": True}]},
     "volumes", [{"hostPath": "/a", "mountPath": "/b", "readOnly": True}]),
    ("driver mounts dropped", {"volumes": [
        "/usr/local/dcmi:/usr/local/dcmi",
        "/usr/local/bin/npu-smi:/usr/local/bin/npu-smi",
        "/usr/local/Ascend/driver/lib64/:/usr/local/Ascend/driver/lib64/",
        "/usr/local/Ascend/driver/version.info:/usr/local/Ascend/driver/version.info",
        "/etc/ascend_install.info:/etc/ascend_install.info",
        "/models:/models"]}, "volumes",
     [{"hostPath": "/models", "mountPath": "/models", "readOnly": False}]),
    ("named volume dropped", {"volumes": ["cache:/root/.cache", "/m:/m"]}, "volumes",
     [{"hostPath": "/m", "mountPath": "/m", "readOnly": False}]),
    ("long volume type dropped", {"volumes": [{"type": "volume", "source": "c", "target": "/c"}]},
     "volumes", []),
    ("relative path resolved", {"volumes": ["./models:/models"]}, "volumes",
     [{"hostPath": "/srv/stack/models", "mountPath": "/models", "readOnly": False}]),
    ("home dropped", {"volumes": ["~/m:/m"]}, "volumes", []),
    ("anonymous dropped", {"volumes": ["/scratch"]}, "volumes", []),
    ("/dev/shm bind dropped", {"volumes": ["/dev/shm:/dev/shm"]}, "volumes", []),
    ("tmpfs shm", {"volumes": [{"type": "tmpfs", "target": "/dev/shm", "tmpfs": {"size": 2**31}}]},
     "shmSize", "2Gi"),
    ("tmpfs beats shm_size", {"shm_size": "1g", "volumes": [
        {"type": "tmpfs", "target": "/dev/shm", "tmpfs": {"size": "4g"}}]}, "shmSize", "4Gi"),
    # shm_size
    ("shm 1g", {"shm_size": "1g"}, "shmSize", "1Gi"),
    ("shm 512m", {"shm_size": "512m"}, "shmSize", "512Mi"),
    ("shm 2gb", {"shm_size": "2gb"}, "shmSize", "2Gi"),
    ("shm GiB", {"shm_size": "16GiB"}, "shmSize", "16Gi"),
    ("shm bytes", {"shm_size": 1073741824}, "shmSize", "1Gi"),
    ("shm fraction", {"shm_size": "1.5g"}, "shmSize", "1536Mi"),
    ("shm odd bytes", {"shm_size": "1000"}, "shmSize", "1000"),
    ("shm default", {}, "shmSize", "1Gi"),
    # networks
    ("network list", {"networks": ["net", "other"]}, "network",
     {"name": "net", "alias": "llm", "endpointMode": "dnsrr"}),
    ("network mapping", {"networks": {"net": {"aliases": ["x"]}}}, "network.alias", "llm"),
    ("network named", {"networks": ["n"], "__top__": {"n": {"external": True, "name": "real"}}},
     "network.name", "real"),
    ("endpoint mode", {"networks": ["net"], "deploy": {"endpoint_mode": "vip"}},
     "network.endpointMode", "vip"),
    ("no network", {}, "network", None),
    # deploy
    ("global", {"deploy": {"mode": "global"}}, "mode", "PerNode"),
    ("replicated default", {}, "mode", "Replicated"),
    ("replicas", {"deploy": {"replicas": 3}}, "replicas", 3),
    ("restart policy", {"deploy": {"restart_policy": {
        "condition": "on-failure", "delay": "5s", "max_attempts": 3, "window": "2m"}}},
     "restartPolicy", {"condition": "on-failure", "delaySeconds": 5, "maxAttempts": 3}),
    ("restart delay composite", {"deploy": {"restart_policy": {"delay": "1m30s"}}},
     "restartPolicy.delaySeconds", 90),
    ("restart delay rounds up", {"deploy": {"restart_policy": {"delay": "500ms"}}},
     "restartPolicy.delaySeconds", 1),
    ("label constraint", {"deploy": {"placement": {"constraints": [
        "node.labels.npu == 910B4", "node.labels.zone==a", "node.role==manager",
        "node.hostname==gpu1", "node.labels.bad!=x"]}}},
     "nodeSelector", {"npu": "910B4", "zone": "a"}),
    # ports
    ("port short", {"ports": ["9000:8000"]}, "publish", {"port": 9000, "mode": "ingress"}),
    ("port short ip/proto", {"ports": ["0.0.0.0:9000:8000/tcp"]}, "publish.port", 9000),
    ("port long host", {"ports": [{"target": 8000, "published": 9001, "mode": "host"}]},
     "publish", {"port": 9001, "mode": "host"}),
    ("port ingress on global -> host", {"ports": ["9000:8000"], "deploy": {"mode": "global"}},
     "publish.mode", "host"),
    ("port ingress on replicas -> host", {"ports": ["9000:8000"], "deploy": {"replicas": 2}},
     "publish.mode", "host"),
    ("ingress port keeps vip", {"ports": ["9000:8000"], "networks": ["net"]},
     "network.endpointMode", "vip"),
    ("host port keeps dnsrr", {"ports": [{"target": 8000, "published": 9000, "mode": "host"}],
                               "networks": ["net"]}, "network.endpointMode", "dnsrr"),
    ("port udp dropped", {"ports": ["9000:8000/udp"]}, "publish", None),
    ("port unpublished dropped", {"ports": ["8000"]}, "publish", None),
    # healthcheck
    ("health path", {"healthcheck": {"test": ["CMD", "curl", "-f", "http://localhost:8000/v1/models"],
                                     "interval": "15s", "timeout": "5s", "retries": 5,
                                     "start_period": "10m"}},
     "healthCheck", {"path": "/v1/models", "intervalSeconds": 15, "timeoutSeconds": 5,
                     "retries": 5, "startPeriodSeconds": 600}),
    ("health shell string",
     {"healthcheck": {"test": "curl -sf http://127.0.0.1:8000/health || exit 1"}},
     "healthCheck.path", "/health"),
]  # fmt: skip


@pytest.mark.parametrize(("service", "path", "expected"), [m[1:] for m in MAPPINGS],
                         ids=[m[0] for m in MAPPINGS])  # fmt: skip
def test_mapping(service: dict[str, Any], path: str, expected: Any) -> None:
    service = dict(service)
    top = service.pop("__top__", None)
    stack = compose(**service)
    if top:
        stack["networks"] = top
    result = import_stack(stack, source="stack.yml", base_dir="/srv/stack")
    assert at(result.services[0].deployment.spec.model_dump(), path) == expected


NOTES = [
    # (service, kind, text that must be in a note of that kind)
    ({"devices": ["/dev/davinci_manager", "/dev/davinci0"], "command": "serve /m"},
     "dropped", "/dev/davinci_manager: Ascend Docker Runtime adds them"),
    ({"devices": ["/dev/fuse", "/dev/davinci0"], "command": "serve /m"},
     "dropped", "/dev/fuse: Swarm services cannot have devices"),
    ({"volumes": ["/usr/local/dcmi:/usr/local/dcmi"]}, "dropped", "/usr/local/dcmi"),
    ({"volumes": ["cache:/c"]}, "dropped", "named volume"),
    ({"volumes": ["./m:/m"]}, "check", "/srv/stack/m: it must exist on every node"),
    ({"command": "serve /m --host 127.0.0.1"}, "dropped", "npuswarm always listens on 0.0.0.0"),
    ({"command": "serve /m -tp 4 --served-model-name a b"}, "dropped", "extra names ['b']"),
    ({"command": "serve /m -tp 4 --port 1 --port 2"}, "check", "given twice"),
    ({"environment": ["A"]}, "dropped", "environment A: no value"),
    ({"environment": ["P=${HOME}/x"]}, "check", "${HOME}"),
    ({"deploy": {"placement": {"constraints": ["node.hostname==gpu1"]}}},
     "dropped", "label the node"),
    ({"deploy": {"placement": {"constraints": ["node.labels.a!=b"]}}}, "dropped", "(==)"),
    ({"deploy": {"restart_policy": {"window": "1m"}}}, "dropped", "window"),
    ({"deploy": {"restart_policy": {"condition": "any"}}}, "check", "Swarm waited 5s"),
    ({"deploy": {"resources": {"limits": {"memory": "1g"}}}}, "dropped", "deploy.resources"),
    ({"deploy": {"restart_policy": {"delay": "1500ms"}}}, "check", "rounded up to 2s"),
    ({"ports": ["9000:8000", "9001:8000"]}, "dropped", "ports 9001"),
    ({"ports": ["9000:7000"]}, "check", "targeted 7000"),
    ({"ports": ["9000:8000"], "deploy": {"mode": "global"}}, "check", "host mode"),
    ({"networks": ["net", "other"]}, "dropped", "['other']"),
    ({"ports": ["9000:8000"], "networks": ["net"], "deploy": {"endpoint_mode": "dnsrr"}},
     "check", "Swarm rejects an ingress port with endpoint_mode dnsrr"),
    ({"networks": ["vllm-net"]}, "check", "NPUSWARM_SHARED_NETWORKS=vllm-net=<namespace>"),
    ({}, "check", "reachable only through spec.publish"),
    ({"healthcheck": {"disable": True}}, "dropped", "always checks health"),
    ({"init": False}, "dropped", "init"),
    ({"entrypoint": None, "command": ["bash", "-c", "vllm serve /m -tp 4"]}, "mapped", "bash -c"),
    ({"command": "serve /data/m -tp 4"}, "check", "under no mounted volume"),
    ({"privileged": True, "cap_add": ["SYS_ADMIN"], "shm_size": "1g", "ipc": "host"},
     "swarm-ignored", "devices, ipc, privileged, shm_size"),
    ({"privileged": True}, "swarm-ignored", "the tasks started without any NPU"),
    ({"cap_add": ["SYS_ADMIN"], "sysctls": {"a": 1}}, "swarm-ignored", "cap_add before 20.10"),
    ({"container_name": "x", "expose": [8000]}, "swarm-ignored", "container_name, devices, expose"),
    ({"privileged": True}, "dropped", "privileged: NPUs reach the task through Ascend"),
    ({"restart": "always"}, "dropped", "deploy.restart_policy is what Swarm uses"),
    ({"network_mode": "host"}, "dropped", "HCCL"),
    ({"env_file": ".env"}, "dropped", "copy the variables into engine.env"),
    ({"cpu_shares": 512}, "dropped", "docker stack deploy refuses it"),
    ({"logging": {"driver": "json-file"}}, "dropped", "logging: no ModelDeployment field"),
]  # fmt: skip


@pytest.mark.parametrize(("service", "kind", "text"), NOTES, ids=[n[2][:40] for n in NOTES])
def test_note(service: dict[str, Any], kind: str, text: str) -> None:
    _, notes = import_one(**service)
    assert text in notes_about(notes, kind)


def test_sanitised_service_name_names_the_deployment_and_alias_and_says_so() -> None:
    spec, notes = import_one("vLLM_Qwen3", networks=["net"])
    result = import_stack(compose("vLLM_Qwen3", networks=["net"]))
    assert result.services[0].name == "vllm-qwen3"
    assert spec["network"]["alias"] == "vllm-qwen3"
    assert "clients that used 'vLLM_Qwen3' must use 'vllm-qwen3'" in notes_about(notes, "check")


def test_namespace_and_provenance_annotation() -> None:
    result = import_stack(compose(), source="stack.yml", namespace="llm")
    metadata = result.services[0].manifest["metadata"]
    assert metadata["namespace"] == "llm"
    assert metadata["annotations"] == {"npuswarm.io/imported-from": "stack.yml service llm"}


def test_non_vllm_services_are_skipped_with_a_note() -> None:
    stack = compose()
    stack["services"]["redis"] = {"image": "redis:7", "command": "redis-server"}
    stack["services"]["old"] = {
        "image": "v",
        "command": ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/m"],
    }
    result = import_stack(stack)
    assert [s.name for s in result.services] == ["llm"]
    skipped = {n.key: n.text for n in result.skipped}
    assert skipped["redis"] == "not a vLLM service (runs redis-server)"
    assert "rewrite it as `vllm serve MODEL" in skipped["old"]


# --- Errors -----------------------------------------------------------------------------------

FILE_ERRORS = [
    ("not yaml", "services: [\n", "not YAML"),
    ("a list", "- a\n- b\n", "not a compose file (expected one YAML mapping)"),
    ("two documents", "a: 1\n---\nb: 2\n", "expected one YAML mapping"),
    ("empty", "", "expected one YAML mapping"),
    ("no services", "version: '3.8'\nnetworks: {}\n", "no `services` mapping"),
    ("empty services", "services: {}\n", "no `services` mapping"),
    ("a ModelDeployment", "apiVersion: npuswarm.io/v1alpha1\nkind: ModelDeployment\n",
     "already a ModelDeployment"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), [e[1:] for e in FILE_ERRORS],
                         ids=[e[0] for e in FILE_ERRORS])  # fmt: skip
def test_not_a_compose_file(text: str, message: str) -> None:
    with pytest.raises(StackFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_compose(text, "f.yml")


SERVICE_ERRORS = [
    ("3 NPUs", {"devices": ["/dev/davinci0", "/dev/davinci1", "/dev/davinci2"],
                "command": "serve /m"},
     "devices name 3 NPUs (0,1,2); npuswarm gives a replica 1, 2, 4 or 8"),
    ("6 NPUs from env", {"devices": None, "environment": ["ASCEND_VISIBLE_DEVICES=0-5"]},
     "ASCEND_VISIBLE_DEVICES name 6 NPUs"),
    ("bad NPU env", {"devices": None, "environment": ["ASCEND_VISIBLE_DEVICES=a"]},
     "not an NPU id"),
    ("tp 3", {"command": "serve /m -tp 3"}, "engine.tensorParallelSize"),
    ("fewer NPUs than tp", {"command": "serve /m -tp 8"}, "npusPerReplica=4 is less than"),
    ("no image", {"image": None}, "has no image"),
    ("port not a number", {"command": "serve /m --port abc"}, "--port 'abc' is not a whole number"),
    ("flag without value", {"command": "serve /m --port"}, "--port has no value"),
    ("flag followed by flag", {"command": "serve /m --max-model-len --port 1"},
     "--max-model-len has no value"),
    ("no model", {"command": "serve --port 8000"}, "vllm serve has no model"),
    ("job mode", {"deploy": {"mode": "replicated-job"}}, "a model server is not a job"),
    ("shell script",
     {"entrypoint": None, "command": ["sh", "-c", "pip install x && vllm serve /m"]},
     "inside a shell script"),
    ("unbalanced quote", {"command": "serve /m --x 'a"}, "cannot split"),
    ("bad shm", {"shm_size": "lots"}, "shm_size: not a size"),
    ("bad delay", {"deploy": {"restart_policy": {"delay": "soon"}}}, "not a duration"),
    ("bad env name", {"environment": ["A.B=1"]}, "not a valid variable name"),
    ("bad restart condition", {"deploy": {"restart_policy": {"condition": "always"}}},
     "restartPolicy.condition"),
    ("entrypoint type", {"entrypoint": {"a": 1}}, "entrypoint must be a string or a list"),
    ("environment type", {"environment": "A=1"}, "environment must be a list or a mapping"),
    # A member of a hand-made multi-node group would otherwise import as a one-node replica.
    ("headless group member",
     {"command": "serve /m --headless --data-parallel-size 4 --data-parallel-start-rank 2"},
     "one node of a multi-node data-parallel group (--data-parallel-start-rank, --headless)"),
    ("group leader", {"command": "serve /m --data-parallel-address=10.0.0.1"},
     "import-stack does not recognise groups"),
]  # fmt: skip


@pytest.mark.parametrize(("service", "message"), [e[1:] for e in SERVICE_ERRORS],
                         ids=[e[0] for e in SERVICE_ERRORS])  # fmt: skip
def test_service_error_names_the_service(service: dict[str, Any], message: str) -> None:
    with pytest.raises(StackFileError) as raised:
        import_one("qwen", **service)
    assert str(raised.value).startswith("service qwen: ")
    assert message in str(raised.value)


def test_no_vllm_service_is_an_error_that_lists_what_was_found() -> None:
    stack = {"services": {"web": {"image": "nginx"}, "db": {"image": "pg", "command": "postgres"}}}
    expected = r"no service runs `vllm serve` \(web: .*image default.*db: .*postgres"
    with pytest.raises(StackFileError, match=expected):
        import_stack(stack, source="s.yml")


def test_every_failing_service_is_reported_at_once() -> None:
    stack = compose("a", command="serve /m -tp 3")
    stack["services"]["b"] = {**BASE, "image": None}
    with pytest.raises(StackFileError) as raised:
        import_stack(stack)
    assert "service a: " in str(raised.value)
    assert "service b: has no image" in str(raised.value)


def test_two_services_with_one_deployment_name_are_an_error() -> None:
    stack = compose("llm_a")
    stack["services"]["llm-a"] = copy.deepcopy(BASE)
    with pytest.raises(StackFileError, match="would both be ModelDeployment llm-a"):
        import_stack(stack)


# --- Value parsers ----------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "size"), [
    ("1g", 2**30), ("1G", 2**30), ("1gb", 2**30), ("1GiB", 2**30), ("512m", 512 * 2**20),
    ("64k", 64 * 2**10), ("100", 100), (4096, 4096), ("2 GB", 2 * 2**30), ("0.5g", 2**29),
])  # fmt: skip
def test_ram_bytes(value: Any, size: int) -> None:
    assert ram_bytes(value) == size


@pytest.mark.parametrize("value", ["", "g", "1x", "-1g", True, "1.2.3g"])
def test_ram_bytes_rejects(value: Any) -> None:
    with pytest.raises(ValueError, match="not a size"):
        ram_bytes(value)


@pytest.mark.parametrize(("size", "text"), [
    (2**30, "1Gi"), (3 * 2**29, "1536Mi"), (2**40, "1Ti"), (1024, "1Ki"), (1000, "1000"), (0, "0"),
])  # fmt: skip
def test_quantity(size: int, text: str) -> None:
    assert quantity(size) == text


@pytest.mark.parametrize(("text", "ns"), [
    ("10s", 10 * 10**9), ("1m30s", 90 * 10**9), ("500ms", 5 * 10**8), ("1h", 3600 * 10**9),
    ("1.5s", 15 * 10**8), ("0", 0), ("2us", 2000), ("7ns", 7),
])  # fmt: skip
def test_duration(text: str, ns: int) -> None:
    assert duration_ns(text) == ns


@pytest.mark.parametrize("text", ["10", "s", "1d", "10s5", 10, "1m x"])
def test_duration_rejects(text: Any) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        duration_ns(text)


# --- The seed and the command line ------------------------------------------------------------


def seed_import() -> StackImport:
    compose_file = parse_compose(SEED_STACK.read_text(), "vllm-stack.yml")
    return import_stack(compose_file, source="vllm-stack.yml")


def test_seed_imports_to_the_hand_written_examples() -> None:
    """The examples differ only where a human chose more than the stack file said: read-only,
    and the cache moved from /root (which npuswarm refuses, as the import notes) to /data."""
    examples = Path(__file__).resolve().parents[2] / "examples"
    for imported in seed_import().services:
        expected = yaml.safe_load((examples / f"{imported.name}.yaml").read_text())
        for volume in expected["spec"]["volumes"]:
            volume["readOnly"] = False  # the stack file mounts them writable
            if volume["hostPath"] == "/data/vllm-cache":
                volume["hostPath"] = "/root/.cache"
        notes = [n.text for n in imported.notes if n.kind == "check"]
        assert any("hostPath /root/.cache is never allowed" in text for text in notes), notes
        got = imported.deployment.spec.model_dump()
        want = cli.ModelDeployment.model_validate(expected).spec.model_dump()
        assert got == want


def test_cli_prints_manifests_and_reports_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["import-stack", str(SEED_STACK), "--namespace", "llm"]) == 0
    out, err = capsys.readouterr()
    documents = list(yaml.safe_load_all(out))
    assert [d["metadata"]["name"] for d in documents] == ["vllm-qwen3", "vllm-coder"]
    assert all(d["metadata"]["namespace"] == "llm" for d in documents)
    assert all(cli.ModelDeployment.model_validate(d).spec.npusPerReplica == 4 for d in documents)
    assert "service vllm-qwen3 -> ModelDeployment vllm-qwen3" in err
    assert "swarm-ignored devices, shm_size" in err
    assert "dropped       volumes: /usr/local/dcmi" in err
    # Notes a reviewer needs travel with the manifest too.
    assert "# swarm-ignored devices, shm_size" in out


def test_cli_pin_npus_keeps_the_stacks_npu_ids(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = cli.main(["import-stack", str(SEED_STACK), "--pin-npus", "-o", str(tmp_path / "out")])
    _, err = capsys.readouterr()
    assert code == 0, err
    pinned = {
        path.stem: cli.ModelDeployment.model_validate(yaml.safe_load(path.read_text())).spec.npuIds
        for path in (tmp_path / "out").glob("*.yaml")
    }
    assert pinned == {"vllm-qwen3": [0, 1, 2, 3], "vllm-coder": [4, 5, 6, 7]}
    assert "--pin-npus: every replica uses exactly these NPUs" in err


def test_cli_writes_one_file_per_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_dir = tmp_path / "manifests"
    assert cli.main(["import-stack", str(SEED_STACK), "-o", str(out_dir)]) == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["vllm-coder.yaml", "vllm-qwen3.yaml"]
    loaded = cli.load_deployments([str(p) for p in sorted(out_dir.iterdir())])
    assert [md.metadata.name for md in loaded] == ["vllm-coder", "vllm-qwen3"]
    assert capsys.readouterr().out == ""


def test_cli_writes_nothing_when_any_service_fails(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    stack = yaml.safe_load(SEED_STACK.read_text())
    stack["services"]["vllm-coder"]["devices"].pop()  # 3 NPUs
    source = tmp_path / "stack.yml"
    source.write_text(yaml.safe_dump(stack))
    out_dir = tmp_path / "out"
    assert cli.main(["import-stack", str(source), "-o", str(out_dir)]) == 2
    _, err = capsys.readouterr()
    assert "service vllm-coder: devices name 3 NPUs" in err
    assert not out_dir.exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["import-stack", "/nonexistent/stack.yml"], "No such file"),
    (["import-stack", str(SEED_STACK), "--namespace", "Not_A_Label"], "is not a DNS label"),
])  # fmt: skip
def test_cli_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_keeps_existing_files_unless_told(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    existing = tmp_path / "vllm-qwen3.yaml"
    existing.write_text("mine\n")
    assert cli.main(["import-stack", str(SEED_STACK), "-o", str(tmp_path)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert existing.read_text() == "mine\n"
    assert not (tmp_path / "vllm-coder.yaml").exists()
    assert cli.main(["import-stack", str(SEED_STACK), "-o", str(tmp_path), "--overwrite"]) == 0
    assert "kind: ModelDeployment" in existing.read_text()


def test_write_files_leaves_no_temp_files_when_a_write_fails(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").mkdir()  # a directory where a file must go: the rename fails
    with pytest.raises(StackFileError):
        write_files(tmp_path, {"a.yaml": "a", "b.yaml": "b"}, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.yaml"]
