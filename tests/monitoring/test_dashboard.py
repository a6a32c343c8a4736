"""The Grafana dashboard: valid JSON whose queries only name metrics the operator exports,
with panels that do not overlap and cover what the issue asks to see."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from .promql import DASHBOARD, PROMETHEUS_SERIES, REPO, exported_series_names, metric_names

SHIPPED = REPO / "manifests" / "monitoring" / "dashboards" / "npuswarm.json"
GRID_WIDTH = 24


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # panels inside collapsed rows
    return found


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    found = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r}", target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        # label_values(selector, label): the label is not a metric.
        match = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", text)
        found.append((f"variable {variable['name']}", match.group(1) if match else text))
    return found


def test_the_grafana_copy_is_the_shipped_one() -> None:
    """Kustomize reads only below manifests/monitoring, so the file there is the one copy."""
    assert DASHBOARD.resolve() == SHIPPED.resolve()


def test_every_expression_names_only_exported_metrics(dashboard: dict[str, Any]) -> None:
    known = exported_series_names() | PROMETHEUS_SERIES
    unknown = [
        f"{where}: {name}"
        for where, expr in expressions(dashboard)
        for name in sorted(metric_names(expr))
        if name not in known
    ]
    assert not unknown
    assert len(expressions(dashboard)) >= 20


def test_queries_use_the_datasource_and_job_variables(dashboard: dict[str, Any]) -> None:
    """A hard-coded datasource breaks the import on every other Grafana; a missing job
    filter mixes in other operators' controller_runtime_* series."""
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            for name in metric_names(target["expr"]):
                assert re.search(rf'{name}\{{[^}}]*job=~"\$job"', target["expr"]), (
                    f'{panel["title"]}: {name} without job=~"$job"'
                )


def test_panels_have_unique_ids_and_do_not_overlap(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= GRID_WIDTH, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_dashboard_shows_what_operators_need(dashboard: dict[str, Any]) -> None:
    every_expr = " ".join(expr for _, expr in expressions(dashboard))
    reconcile = "controller_runtime_reconcile"
    required = {
        "reconcile rate by result": rf"sum by \(result\) \(rate\({reconcile}_total",
        "error ratio": rf"{reconcile}_errors_total.*/.*{reconcile}_total",
        "reconcile p50": rf"histogram_quantile\(0\.5, .*{reconcile}_time_seconds_bucket",
        "reconcile p99": rf"histogram_quantile\(0\.99, .*{reconcile}_time_seconds_bucket",
        "NPUs by state per node": r"sum by \(node, state\) \(npuswarm_npus",
        "deployments by phase": r"sum by \(phase\) \(npuswarm_modeldeployments",
        "replicas desired": r"npuswarm_replicas_desired",
        "replicas placed": r"npuswarm_replicas_placed",
        "replicas ready": r"npuswarm_replicas_ready",
        "unplaced by reason": r"by \(namespace, name, reason\) \(npuswarm_unplaced_replicas",
        "drift corrections": r"npuswarm_drift_corrections_total",
        "Swarm API calls": r"rate\(npuswarm_swarm_api_calls_total",
        "Swarm API latency": r"npuswarm_swarm_api_latency_seconds_bucket",
        "manager reachable": r"npuswarm_swarm_manager_reachable",
    }
    missing = [what for what, pattern in required.items() if not re.search(pattern, every_expr)]
    assert not missing
