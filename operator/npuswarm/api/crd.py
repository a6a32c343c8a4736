"""Generate the CustomResourceDefinition from the pydantic models (``npuswarm crd``).

Kubernetes wants a structural OpenAPI v3 schema: no $ref, no anyOf-with-null, no
additionalProperties next to properties. This turns pydantic's JSON Schema into that.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from npuswarm.api import deployment as deployment_api
from npuswarm.api import gateway as gateway_api
from npuswarm.api import meta

PRINTER_COLUMNS = [
    {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
    {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas"},
    {"name": "NPUs", "type": "integer", "jsonPath": ".status.npus"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]
# `kubectl scale`, HPA and KEDA's ScaledObject write spec.replicas through /scale; HPA also
# needs a selector string there (docs/autoscaling.md).
SCALE_SUBRESOURCE = {
    "specReplicasPath": ".spec.replicas",
    "statusReplicasPath": ".status.replicas",
    "labelSelectorPath": ".status.selector",
}
_DROPPED_KEYS = {"title", "additionalProperties"}


def structural(schema: dict[str, Any], definitions: dict[str, Any] | None = None) -> dict[str, Any]:
    definitions = schema.get("$defs", {}) if definitions is None else definitions
    if "$ref" in schema:
        target = definitions[schema["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return structural(merged, definitions)
    if "anyOf" in schema:
        options = [o for o in schema["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express anyOf {schema['anyOf']} structurally")
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        nullable = structural({**options[0], **rest}, definitions)
        if "enum" in nullable:
            # The API server refuses a null against an enum even with null in it and
            # `nullable` set ("Unsupported value: null", kube-apiserver 1.35); a field that is
            # not nullable has its null pruned before validation instead: unset, as the
            # models take it.
            nullable["enum"] = [value for value in nullable["enum"] if value is not None]
        else:
            nullable["nullable"] = True
        if nullable.get("default") is None:
            nullable.pop("default", None)
        return nullable
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _DROPPED_KEYS or key == "$defs":
            continue
        if key == "const":
            out["enum"] = [value]
        elif key == "properties":
            out["properties"] = {k: structural(v, definitions) for k, v in value.items()}
        elif key == "items":
            out["items"] = structural(value, definitions)
        else:
            out[key] = value
    additional = schema.get("additionalProperties")
    if isinstance(additional, dict):
        out["additionalProperties"] = structural(additional, definitions)
    # A structural schema has neither patternProperties nor propertyNames (the API server
    # refuses the CRD): the values' schema as additionalProperties, the keys' bounds as CEL.
    names = dict(out.pop("propertyNames", None) or {})
    patterns = out.pop("patternProperties", None) or {}
    if len(patterns) > 1:
        raise ValueError(f"cannot express patternProperties {list(patterns)} structurally")
    for pattern, values in patterns.items():
        out["additionalProperties"] = structural(values, definitions)
        names["pattern"] = pattern
    if names:
        out["x-kubernetes-validations"] = [
            *out.get("x-kubernetes-validations", []),
            *key_rules(names),
        ]
    if "enum" in out and "type" not in out:
        out["type"] = "integer" if all(isinstance(v, int) for v in out["enum"]) else "string"
    return out


def key_rules(names: dict[str, Any]) -> list[dict[str, str]]:
    """Bounds on a map's keys (JSON Schema's propertyNames) as CEL rules."""
    rules = []
    if "pattern" in names:
        pattern = names["pattern"]
        rules.append(
            {
                "rule": f"self.all(k, k.matches({json.dumps(pattern)}))",
                "message": f"keys must match {pattern}",
            }
        )
    if "maxLength" in names:
        limit = int(names["maxLength"])
        rules.append(
            {
                "rule": f"self.all(k, size(k) <= {limit})",
                "message": f"keys are at most {limit} characters",
            }
        )
    return rules


# OpenAPI's "integer" takes 2.0, while every CEL rule that reads such a field then fails with
# "expected int, got float64": refuse a fractional-looking number in every integer field, as
# the models do, so acceptance never depends on whether some rule happens to read the field.
INTEGER_RULE = {"rule": "type(self) == int", "message": "must be an integer"}


def integers_only(schema: dict[str, Any]) -> dict[str, Any]:
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: integers_only(v) for k, v in out["properties"].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = integers_only(out[key])
    if out.get("type") == "integer":
        out["x-kubernetes-validations"] = [
            *out.get("x-kubernetes-validations", []),
            dict(INTEGER_RULE),
        ]
    return out


def crd_manifest(kind: str = deployment_api.KIND) -> dict[str, Any]:
    if kind == gateway_api.KIND:
        return gateway_crd_manifest()
    spec_schema = integers_only(structural(deployment_api.ModelDeploymentSpec.model_json_schema()))
    status_schema = structural(deployment_api.ModelDeploymentStatus.model_json_schema())
    # The API server serves an object without status with this one (defaulting on read), so
    # before npuswarm's first write kstatus reads generation 1 as not yet observed (InProgress)
    # instead of "no conditions, so Current", agreeing with Argo CD's health.lua (Progressing).
    status_schema["default"] = {"observedGeneration": 0}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{deployment_api.PLURAL}.{meta.GROUP}",
            # Argo CD: the CRD must exist before any ModelDeployment is applied.
            "annotations": {"argocd.argoproj.io/sync-wave": "-10"},
        },
        "spec": {
            "group": meta.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": deployment_api.KIND,
                "plural": deployment_api.PLURAL,
                "singular": deployment_api.SINGULAR,
                "shortNames": list(deployment_api.SHORT_NAMES),
                "categories": ["npuswarm"],
            },
            "versions": [
                {
                    "name": meta.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}, "scale": SCALE_SUBRESOURCE},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A vLLM model served on Ascend NPUs of a Docker Swarm.",
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                            "required": ["spec"],
                        }
                    },
                }
            ],
        },
    }


GATEWAY_PRINTER_COLUMNS = [
    {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
    {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas"},
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def gateway_crd_manifest() -> dict[str, Any]:
    """The ModelGateway CRD: the same conventions as the ModelDeployment one."""
    manifest = crd_manifest(deployment_api.KIND)
    spec_schema = integers_only(structural(gateway_api.ModelGatewaySpec.model_json_schema()))
    status_schema = structural(gateway_api.ModelGatewayStatus.model_json_schema())
    status_schema["default"] = {"observedGeneration": 0}
    manifest["metadata"]["name"] = f"{gateway_api.PLURAL}.{meta.GROUP}"
    manifest["spec"]["names"] = {
        "kind": gateway_api.KIND,
        "plural": gateway_api.PLURAL,
        "singular": gateway_api.SINGULAR,
        "shortNames": list(gateway_api.SHORT_NAMES),
        "categories": ["npuswarm"],
    }
    (version,) = manifest["spec"]["versions"]
    version["additionalPrinterColumns"] = GATEWAY_PRINTER_COLUMNS
    # A gateway has no selector of its own to offer HPA; its replicas are set in its spec.
    version["subresources"] = {"status": {}}
    schema = version["schema"]["openAPIV3Schema"]
    schema["description"] = "One OpenAI-compatible endpoint for ModelDeployments (vllm-router)."
    schema["properties"]["spec"] = spec_schema
    schema["properties"]["status"] = status_schema
    return manifest


CRD_FILES = {
    deployment_api.KIND: f"{deployment_api.PLURAL}.{meta.GROUP}.yaml",
    gateway_api.KIND: f"{gateway_api.PLURAL}.{meta.GROUP}.yaml",
}


def render_yaml(kind: str = deployment_api.KIND) -> str:
    source = "api/gateway.py" if kind == gateway_api.KIND else "api/deployment.py"
    flag = "" if kind == deployment_api.KIND else f" --kind {kind}"
    header = f"# Generated by `npuswarm crd{flag}` from operator/npuswarm/{source}. Do not edit.\n"
    return header + yaml.safe_dump(crd_manifest(kind), sort_keys=False, width=100)
