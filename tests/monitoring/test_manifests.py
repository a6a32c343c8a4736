"""manifests/monitoring renders with kustomize into what Prometheus Operator and Grafana's
sidecar need, and selects the operator's metrics Service as manifests/base defines it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .promql import DASHBOARD, REPO, load_rule

MONITORING = REPO / "manifests" / "monitoring"
NAMESPACE = "npuswarm-system"


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found:
        return found
    import controlplane  # hack/, on sys.path from tests/conftest.py

    try:
        return str(controlplane.binaries()["kubectl"])
    except controlplane.BinariesMissingError as error:
        pytest.fail(f"kubectl (for kustomize) not found: {error}", pytrace=False)


def render(path: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(path)], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, Any]]:
    objects = render(MONITORING)
    by_kind = {o["kind"]: o for o in objects}
    assert len(by_kind) == len(objects), "one object of each kind expected"
    return by_kind


def test_renders_the_three_objects_in_the_operator_namespace(
    rendered: dict[str, dict[str, Any]],
) -> None:
    assert set(rendered) == {"ServiceMonitor", "PrometheusRule", "ConfigMap"}
    for obj in rendered.values():
        assert obj["metadata"]["namespace"] == NAMESPACE
    assert rendered["PrometheusRule"]["spec"] == load_rule()["spec"]


def test_dashboard_configmap_is_labelled_for_the_grafana_sidecar(
    rendered: dict[str, dict[str, Any]],
) -> None:
    configmap = rendered["ConfigMap"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    (content,) = configmap["data"].values()
    assert json.loads(content) == json.loads(DASHBOARD.read_text())


def base_metrics_service() -> dict[str, Any]:
    services = [
        o
        for o in render(REPO / "manifests" / "base")
        if o["kind"] == "Service" and any(p.get("name") == "metrics" for p in o["spec"]["ports"])
    ]
    assert len(services) == 1, "manifests/base should have one Service with a metrics port"
    return services[0]


def test_servicemonitor_selects_the_operator_metrics_service(
    rendered: dict[str, dict[str, Any]],
) -> None:
    monitor = rendered["ServiceMonitor"]["spec"]
    service = base_metrics_service()
    labels = service["metadata"]["labels"]
    assert service["metadata"]["namespace"] in monitor["namespaceSelector"]["matchNames"]
    assert monitor["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["endpoints"]
    metrics_port = next(p for p in service["spec"]["ports"] if p["name"] == endpoint["port"])
    assert metrics_port["port"] == 8081
    # The rules select job="npuswarm": that is the value of the Service label named jobLabel.
    assert labels[monitor["jobLabel"]] == "npuswarm"
    # The per-deployment series' own namespace label must survive the scrape.
    assert endpoint["honorLabels"] is True
