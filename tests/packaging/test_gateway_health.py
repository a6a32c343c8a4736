"""A ModelGateway's status reads the same in Argo CD (health.lua, embedded for the kind in
argocd-cm-patch.yaml) and in kstatus (Flux, kpt, cli-utils): statuses computed by
npuswarm.gateway.backends.gateway_status for each situation, read by both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from npuswarm.api.gateway import ModelGateway
from npuswarm.gateway.backends import GatewayReplica, GatewayWork, gateway_status
from tests import kstatus
from tests.unit.builders import NOW

from .test_argocd_health import run_health

REPLICA = GatewayReplica("host1", "10.0.0.1", 8079, "10.0.0.1:8000")
GATEWAY = ModelGateway.model_validate(
    {
        "metadata": {"name": "gw", "namespace": "ai", "generation": 2},
        "spec": {"network": {"name": "vllm-net"}, "replicas": 1},
    }
)
SITUATIONS: dict[str, tuple[GatewayWork, str, str]] = {
    # name: (work, Argo CD verdict, kstatus verdict)
    "ready": (GatewayWork(GATEWAY, {"m": ["http://10.0.1.1:8000"]}, [REPLICA]), "Healthy", "Current"),
    "starting": (GatewayWork(GATEWAY, {"m": ["http://10.0.1.1:8000"]}, []), "Progressing", "InProgress"),
    "push-failed": (
        GatewayWork(GATEWAY, {"m": ["http://10.0.1.1:8000"]}, [REPLICA], {REPLICA.admin_url: "401"}),
        "Progressing",
        "InProgress",
    ),
    "model-without-backend": (GatewayWork(GATEWAY, {"m": []}, [REPLICA]), "Degraded", "Failed"),
    "no-root-key": (
        GatewayWork(GATEWAY, {"m": []}, [], problem=("NotConfigured", "NPUSWARM_GATEWAY_ROOT_KEY is not set")),
        "Degraded",
        "Failed",
    ),
    "image-refused": (
        GatewayWork(GATEWAY, {"m": []}, [], problem=("PolicyViolation", "spec.image 'x' is not an allowed image")),
        "Degraded",
        "Failed",
    ),
}


def gateway_object(name: str) -> dict[str, Any]:
    work, _, _ = SITUATIONS[name]
    status = gateway_status(work, {"m": "ai/m"}, [], NOW)
    return {
        "apiVersion": "npuswarm.io/v1alpha1",
        "kind": "ModelGateway",
        "metadata": {"name": name, "namespace": "ai", "generation": 2},
        "spec": {"network": {"name": "vllm-net"}},
        "status": status.model_dump(mode="json", exclude_none=True),
    }


@pytest.mark.parametrize("name", sorted(SITUATIONS))
def test_argocd_and_kstatus_agree_on_gateways(name: str, tmp_path: Path) -> None:
    obj = gateway_object(name)
    _, argocd, verdict = SITUATIONS[name]
    assert run_health(obj)["status"] == argocd
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(obj))
    (found,) = kstatus.verdicts(path)
    assert found["status"] == verdict, found


def test_a_model_without_backend_names_the_model_for_both() -> None:
    obj = gateway_object("model-without-backend")
    assert run_health(obj)["message"] == "no ready replica of m"
