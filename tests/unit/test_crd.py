from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from npuswarm.api.crd import crd_manifest, render_yaml
from npuswarm.cli import CRD_PATH, main

REPO = Path(__file__).resolve().parents[2]


def test_crds_folder_is_generated_from_the_models() -> None:
    committed = (REPO / CRD_PATH).read_text()
    assert committed == render_yaml(), "crds/ is stale: run `npuswarm crd > crds/modeldeployments.npuswarm.io.yaml`"


def test_crd_check_command_detects_staleness(tmp_path: Path) -> None:
    stale = tmp_path / "crd.yaml"
    stale.write_text("old")
    assert main(["crd", "--check", str(stale)]) == 1
    stale.write_text(render_yaml())
    assert main(["crd", "--check", str(stale)]) == 0


def walk(schema: object) -> list[dict[str, object]]:
    found = []
    if isinstance(schema, dict):
        found.append(schema)
        for value in schema.values():
            found.extend(walk(value))
    elif isinstance(schema, list):
        for value in schema:
            found.extend(walk(value))
    return found


def test_schema_is_structural_and_rejects_what_it_can() -> None:
    version = crd_manifest()["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    for node in walk(schema):
        assert "$ref" not in node and "anyOf" not in node and "title" not in node
        assert not ("properties" in node and "additionalProperties" in node)
    spec = schema["properties"]["spec"]["properties"]
    # Optional and not nullable: the API server prunes an explicit null (an enum refuses a
    # null even when it lists null and the field is nullable).
    assert spec["npusPerReplica"]["enum"] == [1, 2, 4, 8]
    assert "nullable" not in spec["npusPerReplica"]
    assert spec["engine"]["properties"]["tensorParallelSize"]["enum"] == [1, 2, 4, 8]
    assert spec["replicas"]["minimum"] == 0
    assert spec["mode"]["enum"] == ["Replicated", "PerNode"]
    assert version["subresources"] == {
        "status": {},
        "scale": {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        },
    }
    status = schema["properties"]["status"]["properties"]
    # HPA reads the selector as one serialized string, not a LabelSelector object.
    assert status["selector"]["type"] == "string"
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Ready", "Replicas", "NPUs", "Phase", "Age"]


def test_committed_gateway_crd_is_current() -> None:
    committed = (REPO / "crds" / "modelgateways.npuswarm.io.yaml").read_text()
    assert committed == render_yaml("ModelGateway"), (
        "crds/ is stale: run `npuswarm crd --kind ModelGateway > crds/modelgateways.npuswarm.io.yaml`"
    )


def test_gateway_crd_refuses_what_the_model_refuses() -> None:
    schema = crd_manifest("ModelGateway")["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec = schema["properties"]["spec"]
    assert spec["required"] == ["network"]
    assert {"rule": "self.adminPort != self.port", "message": "adminPort must differ from port"} in spec[
        "x-kubernetes-validations"
    ]
    assert spec["properties"]["policy"]["enum"] == ["cache_aware", "power_of_two", "round_robin", "random"]


NOT_STRUCTURAL = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "patternProperties", "propertyNames",
                  "title", "const"}


@pytest.mark.parametrize("kind", ["ModelDeployment", "ModelGateway"])
def test_schemas_are_structural(kind: str) -> None:
    """The API server refuses a CRD whose schema has any of NOT_STRUCTURAL (a map keyed by a
    pattern, ModelGateway's clientAccess.keys, once came out as patternProperties); the key
    pattern becomes a CEL rule instead."""
    found: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            found.extend(f"{path}.{key}" for key in node if key in NOT_STRUCTURAL)
            for key, value in node.items():
                if key not in ("properties", "enum", "default", "x-kubernetes-validations"):
                    walk(value, f"{path}.{key}")
            for name, value in (node.get("properties") or {}).items():
                walk(value, f"{path}.{name}")

    for version in crd_manifest(kind)["spec"]["versions"]:
        walk(version["schema"]["openAPIV3Schema"], version["name"])
    assert found == []
    if kind == "ModelGateway":
        keys = crd_manifest(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        keys = keys["properties"]["spec"]["properties"]["clientAccess"]["properties"]["keys"]
        assert "self.all(k, k.matches(" in keys["x-kubernetes-validations"][0]["rule"]
