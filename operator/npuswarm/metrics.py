"""Prometheus metrics. Reconcile metrics reuse controller-runtime's names and buckets, so the
dashboards and alerts people already run for Go operators work for npuswarm unchanged.

Label values are bounded: controller names, results, node ids, phases, reasons. Never task
ids or error strings.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)
CONTROLLER = "modeldeployment"

# controller-runtime's reconcile-time buckets (pkg/internal/controller/metrics).
RECONCILE_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7,
    0.8, 0.9, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5, 6, 7, 8, 9, 10, 15,
    20, 25, 30, 40, 50, 60,
)  # fmt: skip
SWARM_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

reconcile_total = Counter(
    "controller_runtime_reconcile_total",
    "Total number of reconciliations per controller.",
    ["controller", "result"],
    registry=REGISTRY,
)
reconcile_errors_total = Counter(
    "controller_runtime_reconcile_errors_total",
    "Total number of reconciliation errors per controller.",
    ["controller"],
    registry=REGISTRY,
)
reconcile_time_seconds = Histogram(
    "controller_runtime_reconcile_time_seconds",
    "Length of time per reconciliation per controller.",
    ["controller"],
    buckets=RECONCILE_BUCKETS,
    registry=REGISTRY,
)
max_concurrent_reconciles = Gauge(
    "controller_runtime_max_concurrent_reconciles",
    "Maximum number of concurrent reconciles per controller.",
    ["controller"],
    registry=REGISTRY,
)
active_workers = Gauge(
    "controller_runtime_active_workers",
    "Number of currently used workers per controller.",
    ["controller"],
    registry=REGISTRY,
)
leader = Gauge(
    "npuswarm_leader",
    "1 while this operator instance is the active one (kopf peering), else 0.",
    registry=REGISTRY,
)
npus = Gauge(
    "npuswarm_npus",
    "NPUs per Swarm node by state: free, allocated, reserved or unhealthy (node not ready).",
    ["node", "state"],
    registry=REGISTRY,
)
deployments = Gauge(
    "npuswarm_modeldeployments",
    "ModelDeployments by phase.",
    ["phase"],
    registry=REGISTRY,
)
replicas_desired = Gauge(
    "npuswarm_replicas_desired",
    "Replicas a ModelDeployment asks for.",
    ["namespace", "name"],
    registry=REGISTRY,
)
replicas_placed = Gauge(
    "npuswarm_replicas_placed",
    "Replicas of a ModelDeployment that have a node and NPUs.",
    ["namespace", "name"],
    registry=REGISTRY,
)
replicas_ready = Gauge(
    "npuswarm_replicas_ready",
    "Replicas of a ModelDeployment whose Swarm task runs the current spec.",
    ["namespace", "name"],
    registry=REGISTRY,
)
unplaced_replicas = Gauge(
    "npuswarm_unplaced_replicas",
    "Replicas that could not be placed, by reason.",
    ["namespace", "name", "reason"],
    registry=REGISTRY,
)
drift_corrections_total = Counter(
    "npuswarm_drift_corrections_total",
    "Corrections of Swarm drift by kind: service_recreated, service_updated, replica_replaced.",
    ["kind"],
    registry=REGISTRY,
)
swarm_api_calls_total = Counter(
    "npuswarm_swarm_api_calls_total",
    "Docker Engine API calls by operation and outcome (success or error).",
    ["operation", "outcome"],
    registry=REGISTRY,
)
swarm_api_latency_seconds = Histogram(
    "npuswarm_swarm_api_latency_seconds",
    "Latency of Docker Engine API calls by operation.",
    ["operation"],
    buckets=SWARM_BUCKETS,
    registry=REGISTRY,
)
swarm_reachable = Gauge(
    "npuswarm_swarm_manager_reachable",
    "1 when the last probe of the Swarm manager answered, else 0.",
    registry=REGISTRY,
)
last_success_timestamp = Gauge(
    "npuswarm_last_successful_reconcile_timestamp_seconds",
    "Unix time of the last successful reconcile of a ModelDeployment.",
    ["namespace", "name"],
    registry=REGISTRY,
)


# Every result series exists from the start, at 0, so rate() and ratio alerts see a zero
# rather than an absent series before the first error.
for _result in ("success", "error", "requeue", "requeue_after"):
    reconcile_total.labels(CONTROLLER, _result)
reconcile_errors_total.labels(CONTROLLER)


@contextmanager
def swarm_call(operation: str) -> Iterator[None]:
    started = time.monotonic()
    outcome = "error"
    try:
        yield
        outcome = "success"
    finally:
        swarm_api_latency_seconds.labels(operation).observe(time.monotonic() - started)
        swarm_api_calls_total.labels(operation, outcome).inc()


def set_unplaced(namespace: str, name: str, counts: dict[str, int]) -> None:
    """Replace a deployment's unplaced series: a reason that went away must read absent."""
    for labels in list(unplaced_replicas._metrics):
        if labels[:2] == (namespace, name) and labels[2] not in counts:
            unplaced_replicas.remove(*labels)
    for reason, count in counts.items():
        unplaced_replicas.labels(namespace, name, reason).set(count)


def forget_deployment(namespace: str, name: str) -> None:
    """Drop a deleted deployment's series so dashboards do not show ghosts."""
    for gauge in (replicas_desired, replicas_placed, replicas_ready, last_success_timestamp):
        with suppress(KeyError):
            gauge.remove(namespace, name)
    set_unplaced(namespace, name, {})
