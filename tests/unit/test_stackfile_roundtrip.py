"""export-stack: rendered services as compose; export -> import keeps a deployment's meaning."""

from __future__ import annotations

import string
from typing import Any

import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from npuswarm.api import deployment as deployment_api
from npuswarm.api.deployment import ModelDeployment
from npuswarm.api.meta import ObjectMeta
from npuswarm.stackfiles.compose import EXTENSION, RUNTIME_DRIVER_MOUNTS, parse_compose
from npuswarm.core.snapshot import SwarmSnapshot
from npuswarm.core.placement import Assignment
from npuswarm.core.render import network_alias, render_service
from npuswarm.stackfiles.exporter import compose_service, export_stack, planned_services
from npuswarm.stackfiles.importer import import_stack, manifest_yaml

from .builders import NOW, deployment, node


def placed(md: ModelDeployment, nodes: int = 1) -> dict[str, dict[str, Any]]:
    """Rendered specs as npuswarm would create them: every replica placed."""
    npus = frozenset(range(md.spec.npus_per_replica))
    if md.spec.mode == "PerNode":
        slots = [(f"node-{i}", f"node-{i}") for i in range(nodes)]
    else:
        slots = [(str(i), f"node-{i}") for i in range(md.spec.replicas)]
    return {
        slot: render_service(
            md, Assignment(deployment=md.key, slot=slot, node_id=node, npus=npus, kept=False)
        )
        for slot, node in slots
    }


def export(*deployments: ModelDeployment, nodes: int = 1) -> str:
    return export_stack(deployments, {md.key: placed(md, nodes) for md in deployments})


def qwen3(**spec: Any) -> ModelDeployment:
    base: dict[str, Any] = {
        "npusPerReplica": 4,
        "engine": {"tensorParallelSize": 4, "port": 8001, "env": {"A": "x"}},
        "volumes": [{"hostPath": "/models", "mountPath": "/models", "readOnly": True}],
        "shmSize": "2Gi",
        "network": {"name": "vllm-net"},
    }
    return deployment("qwen3", **(base | spec))


# --- export -----------------------------------------------------------------------------------


def test_compose_service_carries_npus_pin_shm_and_init() -> None:
    md = qwen3()
    spec = render_service(
        md, Assignment(deployment=md.key, slot="0", node_id="abc", npus=frozenset({4, 5, 6, 7}),
                       kept=False)
    )  # fmt: skip
    service = compose_service(md, spec)
    assert service["environment"]["ASCEND_VISIBLE_DEVICES"] == "4,5,6,7"
    assert service["environment"]["ASCEND_RT_VISIBLE_DEVICES"] == "0,1,2,3"
    assert service["deploy"]["placement"]["constraints"] == ["node.id==abc"]
    shm = {"type": "tmpfs", "target": "/dev/shm", "tmpfs": {"size": 2 * 2**30}}
    assert shm in service["volumes"]
    assert service["init"] is True
    assert service["entrypoint"] == ["vllm"]
    assert service["command"][:2] == ["serve", "/models/qwen3"]
    assert service["networks"] == {"vllm-net": {"aliases": ["qwen3"]}}
    assert service[EXTENSION]["deployment"] == "default/qwen3"
    assert service[EXTENSION]["npus"] == "4,5,6,7"


def test_export_leaves_out_ownership_labels_so_npuswarm_never_adopts_the_services() -> None:
    text = export(qwen3())
    service = next(iter(parse_compose(text, "x")["services"].values()))
    assert "labels" not in service
    assert "labels" not in service["deploy"]
    assert "npuswarm.io/managed-by" not in text


def test_export_escapes_dollars_that_compose_would_interpolate() -> None:
    md = qwen3(engine={"tensorParallelSize": 4, "env": {"P": "${HOME}/$x"}})
    service = next(iter(parse_compose(export(md), "x")["services"].values()))
    assert service["environment"]["P"] == "$${HOME}/$$x"


def test_export_one_service_per_replica_with_its_node_and_external_network() -> None:
    md = qwen3(mode="PerNode", nodeSelector={"npu": "910B4"})
    compose = parse_compose(export(md, nodes=3), "x")
    assert sorted(compose["services"]) == [
        "default-qwen3-node-0", "default-qwen3-node-1", "default-qwen3-node-2"
    ]  # fmt: skip
    constraints = compose["services"]["default-qwen3-node-2"]["deploy"]["placement"]["constraints"]
    assert constraints == ["node.id==node-2", "node.labels.npu==910B4"]
    assert compose["networks"] == {"vllm-net": {"external": True}}


def test_export_says_which_replicas_are_not_placed() -> None:
    md = qwen3(replicas=2)
    text = export_stack([md], {md.key: {}}, {md.key: ["replica 1: InsufficientNPUs: none free"]})
    assert "# default/qwen3: NOT PLACED: replica 1: InsufficientNPUs: none free" in text
    assert yaml.safe_load(text)["services"] == {}


def test_export_places_all_files_in_one_pass_so_models_never_share_npus() -> None:
    """Files have no creationTimestamp: each one must not be placed as if it came last."""
    models = [
        qwen3(mode="PerNode").model_copy(update={"metadata": ObjectMeta(name=name)})
        for name in ("qwen3", "coder")
    ]
    snapshot = SwarmSnapshot(nodes=[node("n1", 8)], services=[])
    rendered, unplaced = planned_services(models, snapshot, NOW, 120)
    npus = {
        key: specs["n1"]["Labels"]["npuswarm.io/npus"] for key, specs in rendered.items()
    }
    assert npus == {"default/qwen3": "0,1,2,3", "default/coder": "4,5,6,7"}
    assert unplaced == {"default/qwen3": [], "default/coder": []}


def test_exported_replicas_that_differ_are_not_merged() -> None:
    md = qwen3(replicas=2)
    compose = parse_compose(export(md), "x")
    compose["services"]["default-qwen3-1"]["image"] = "other:1"
    try:
        import_stack(compose)
    except ValueError as error:
        assert "are replicas of qwen3 but differ" in str(error)
    else:
        raise AssertionError("differing replicas were merged")


def test_seed_examples_round_trip() -> None:
    md = qwen3(mode="PerNode", publish={"port": 9000, "mode": "host"})
    back = import_stack(parse_compose(export(md, nodes=2), "x")).services
    assert len(back) == 1
    assert meaning(back[0].deployment) == meaning(md)


# --- export -> import keeps the meaning -------------------------------------------------------

SAFE = string.ascii_letters + string.digits
segment = st.text(string.ascii_lowercase + string.digits + "_-", min_size=1, max_size=8)
abs_path = st.lists(segment, min_size=1, max_size=3).map(lambda parts: "/" + "/".join(parts))
dns_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
word = st.text(SAFE + "._/:", min_size=1, max_size=20).filter(lambda w: not w.startswith("-"))
# Values anywhere in a compose file: `$` must survive compose interpolation, `=` env splitting.
env_value = st.text(
    st.characters(codec="utf-8", categories=("L", "N", "P", "S", "Zs")), max_size=20
) | st.lists(st.sampled_from(["$", "$$", "${X}", "$Y", "=", "a", " "]), max_size=6).map("".join)
env_name = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True).filter(
    lambda n: n not in deployment_api.OPERATOR_OWNED_ENV
)
# Flags vLLM takes that npuswarm has no field for; owned flags are rejected by the API itself.
extra_arg = st.one_of(
    st.sampled_from([
        "--trust-remote-code", "--dtype", "bfloat16", "--gpu-memory-utilization", "0.9",
        "--enforce-eager", "--block-size", "128", "--quantization", "ascend", "--seed=7",
    ]),
    word,
)  # fmt: skip
seconds = st.integers(1, 7200)


@st.composite
def model_deployments(draw: st.DrawFn) -> ModelDeployment:
    tp = draw(st.sampled_from(deployment_api.NPU_COUNTS))
    mode = draw(st.sampled_from(["Replicated", "PerNode"]))
    mounts = draw(st.lists(abs_path, max_size=3, unique=True))
    spec: dict[str, Any] = {
        "image": draw(st.sampled_from(["quay.io/ascend/vllm-ascend:v0.9.2rc1", "vllm:dev"])),
        "model": draw(st.one_of(abs_path, word)),
        "servedModelName": draw(st.none() | word),
        "mode": mode,
        "replicas": draw(st.integers(1, 3)),
        "npusPerReplica": (npus := draw(st.none() | st.sampled_from([n for n in deployment_api.NPU_COUNTS if n >= tp]))),
        "npuIds": draw(st.none() | st.sets(st.integers(0, 7), min_size=npus or tp, max_size=npus or tp).map(sorted)),
        "engine": {
            "tensorParallelSize": tp,
            "enableExpertParallel": draw(st.booleans()),
            "maxModelLen": draw(st.none() | st.integers(1, 1_000_000)),
            "port": draw(st.integers(1, 65535)),
            "extraArgs": draw(st.lists(extra_arg, max_size=5)),
            "env": draw(st.dictionaries(env_name, env_value, max_size=4)),
        },
        "volumes": [
            {"hostPath": draw(abs_path), "mountPath": target, "readOnly": draw(st.booleans())}
            for target in mounts
            if target != "/dev/shm"
        ],
        "shmSize": draw(st.from_regex(r"[1-9][0-9]{0,3}(Ki|Mi|Gi|k|M|G)?", fullmatch=True)),
        "nodeSelector": draw(
            st.dictionaries(
                st.from_regex(r"[a-z0-9][a-z0-9./-]{0,15}", fullmatch=True),
                st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,10}", fullmatch=True),
                max_size=2,
            )
        ),
        "network": draw(
            st.none()
            | st.fixed_dictionaries(
                {
                    "name": dns_label,
                    "alias": st.none() | dns_label,
                    "endpointMode": st.sampled_from(["vip", "dnsrr"]),
                }
            )
        ),
        "publish": draw(
            st.none()
            | st.fixed_dictionaries(
                {"port": st.integers(1, 65535), "mode": st.sampled_from(["host", "ingress"])}
            )
        ),
        "healthCheck": {
            "path": draw(st.from_regex(r"/[A-Za-z0-9/_.-]{0,15}", fullmatch=True)),
            "startPeriodSeconds": draw(st.integers(0, 7200)),
            "intervalSeconds": draw(seconds),
            "timeoutSeconds": draw(seconds),
            "retries": draw(st.integers(1, 10)),
        },
        "updateStrategy": draw(
            st.fixed_dictionaries(
                {"maxUnavailable": st.integers(0, 3), "maxSurge": st.integers(0, 3)}
            )
        ),
        "restartPolicy": {
            "condition": draw(st.sampled_from(["none", "on-failure", "any"])),
            "delaySeconds": draw(st.integers(0, 600)),
            "maxAttempts": draw(st.integers(0, 10)),
        },
    }
    # Host paths the importer drops on purpose (the runtime mounts them) are not round-trip data.
    assume(all(v["hostPath"] not in RUNTIME_DRIVER_MOUNTS for v in spec["volumes"]))
    manifest = {"metadata": {"name": draw(dns_label), "namespace": draw(dns_label)}, "spec": spec}
    try:
        return ModelDeployment.model_validate(manifest)
    except ValidationError:
        assume(False)
        raise


def meaning(md: ModelDeployment) -> dict[str, Any]:
    """What a deployment does, independent of how its manifest spells it."""
    spec = md.spec
    return {
        "name": md.metadata.name,
        "namespace": md.metadata.namespace,
        "image": spec.image,
        "model": spec.model,
        "served": spec.served_model_name,
        "mode": spec.mode,
        "replicas": spec.replicas if spec.mode == "Replicated" else None,
        "npus": spec.npus_per_replica,
        "engine": spec.engine.model_dump(),
        "volumes": [v.model_dump() for v in spec.volumes],
        "shm": spec.shm_size_bytes,
        "nodeSelector": spec.nodeSelector,
        "network": (spec.network.name, network_alias(md), spec.network.endpointMode)
        if spec.network
        else None,
        "publish": spec.publish.model_dump() if spec.publish else None,
        "health": spec.healthCheck.model_dump(),
        "update": spec.updateStrategy.model_dump(),
        "npuIds": spec.npuIds,
        "restart": spec.restartPolicy.model_dump(),
    }


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(md=model_deployments(), nodes=st.integers(1, 3))
def test_export_then_import_keeps_the_meaning(md: ModelDeployment, nodes: int) -> None:
    text = export(md, nodes=nodes)
    result = import_stack(parse_compose(text, "exported.yml"), source="exported.yml")
    assert len(result.services) == 1
    assert meaning(result.services[0].deployment) == meaning(md)
    # What is written (comments and all) is what was validated.
    written = yaml.safe_load(manifest_yaml(result.services[0]))
    assert meaning(ModelDeployment.model_validate(written)) == meaning(md)


def test_a_name_with_double_dashes_comes_back_unchanged() -> None:
    # Found by the property above: `0--0` is a valid name that came back as `0-0`.
    md = ModelDeployment.model_validate(
        {"metadata": {"name": "0--0", "namespace": "a"}, "spec": {"image": "x:1", "model": "/m"}}
    )
    result = import_stack(parse_compose(export(md, nodes=1), "e.yml"), source="e.yml")
    assert result.services[0].deployment.metadata.name == "0--0"
