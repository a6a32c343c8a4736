"""Prometheus metrics. Reconcile metrics reuse controller-runtime's names and buckets, so the
dashboards and alerts people already run for Go operators work for npuswarm unchanged.

Label values are bounded: controller names, results, node ids, phases, reasons. Never task
ids or error strings.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from npuswarm.api.meta import split_key
from npuswarm.nodehealth.npusmi import NpuReading
from npuswarm.nodehealth.roce import NET_HEALTHY, RoceLink

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
drift_corrections_total = Counter(
    "npuswarm_drift_corrections_total",
    "Corrections of Swarm drift by kind: service_recreated, service_updated, replica_replaced.",
    ["kind"],
    registry=REGISTRY,
)
swarm_api_calls_total = Counter(
    "npuswarm_swarm_api_calls_total",
    "Docker Engine API calls by operation and outcome (success, error, or fenced: not sent "
    "without the leadership lease).",
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
passes_total = Counter(
    "npuswarm_passes_total",
    "Reconcile passes over the whole Swarm, by result (success, error, fenced).",
    ["result"],
    registry=REGISTRY,
)
pass_duration_seconds = Histogram(
    "npuswarm_pass_duration_seconds",
    "Duration of one reconcile pass over the whole Swarm (observe, plan, writes).",
    buckets=RECONCILE_BUCKETS,
    registry=REGISTRY,
)
pass_phase_seconds = Histogram(
    "npuswarm_pass_phase_seconds",
    "Where a pass's time goes, by phase: waited (from the first trigger it serves to its "
    "start), observe (Swarm's lists), plan (place, render, diff), gateways, apply (the Swarm "
    "writes), report (statuses and events computed; writing them is in the background).",
    ["phase"],
    buckets=RECONCILE_BUCKETS,
    registry=REGISTRY,
)
pass_writes_total = Counter(
    "npuswarm_pass_writes_total",
    "Swarm writes made by reconcile passes.",
    registry=REGISTRY,
)
orphans_removed_total = Counter(
    "npuswarm_orphans_removed_total",
    "Services removed because their owner ModelDeployment no longer exists.",
    registry=REGISTRY,
)
preemptions_total = Counter(
    "npuswarm_preemptions_total",
    "Replicas stopped to make room for a higher-priority deployment's replica, by the "
    "stopped replica's namespace (docs/priority.md).",
    ["namespace"],
    registry=REGISTRY,
)
background_errors_total = Counter(
    "npuswarm_background_errors_total",
    "Exceptions survived by a background loop (pass, events, task-poll, swarm-probe, "
    "leadership, node-check, autoscaler).",
    ["loop"],
    registry=REGISTRY,
)
kube_api_errors_total = Counter(
    "npuswarm_kube_api_errors_total",
    "Kubernetes API calls of npuswarm's own that failed, by operation (status, event, "
    "orphan_list, index_list): retried, never acted on as if they had succeeded.",
    ["operation"],
    registry=REGISTRY,
)
gc_seconds_total = Counter(
    "npuswarm_gc_seconds_total",
    "CPU seconds CPython's cyclic garbage collector spent, by generation (2: full "
    "collections; runtime/heap.py keeps them few and small at fleet size).",
    ["generation"],
    registry=REGISTRY,
)
malloc_trim_seconds_total = Counter(
    "npuswarm_malloc_trim_seconds_total",
    "CPU seconds spent giving glibc's free heap pages back to the OS (runtime/heap.py: after "
    "a pass, at most once a minute).",
    registry=REGISTRY,
)
workqueue_depth = Gauge(
    "workqueue_depth",
    "ModelDeployments waiting for the next pass.",
    ["name"],
    registry=REGISTRY,
)


# Every result series exists from the start, at 0, so rate() and ratio alerts see a zero
# rather than an absent series before the first error.
for _result in ("success", "error", "requeue", "requeue_after"):
    reconcile_total.labels(CONTROLLER, _result)
reconcile_errors_total.labels(CONTROLLER)
for _result in ("success", "error"):
    passes_total.labels(_result)
for _loop in (
    "pass",
    "events",
    "task-poll",
    "swarm-probe",
    "leadership",
    "node-check",
    "autoscaler",
):
    background_errors_total.labels(_loop)
workqueue_depth.labels(CONTROLLER)
for _generation in ("0", "1", "2"):
    gc_seconds_total.labels(_generation)


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


class PassCollector:
    """Gauges that describe the last finished pass: NPUs per node and state, deployments by
    phase, replicas per deployment. Collected from one immutable view swapped in whole, so a
    scrape never sees a half-filled set and an older pass never overwrites a newer one."""

    def __init__(self) -> None:
        self._view: PassMetrics | None = None
        self._lock = threading.Lock()

    def publish(self, view: PassMetrics) -> None:
        with self._lock:
            if self._view is None or view.sequence > self._view.sequence:
                self._view = view

    def collect(self) -> Iterator[Metric]:
        view = self._view
        npus = GaugeMetricFamily(
            "npuswarm_npus",
            "NPUs per Swarm node by state: free, allocated, foreign (held by a service "
            "npuswarm does not own), reserved or unhealthy (node not ready).",
            labels=["node", "state"],
        )
        phases = GaugeMetricFamily(
            "npuswarm_modeldeployments", "ModelDeployments by phase.", labels=["phase"]
        )
        per_deployment = {
            name: GaugeMetricFamily(name, text, labels=["namespace", "name"])
            for name, text in REPLICA_GAUGES.items()
        }
        unplaced = GaugeMetricFamily(
            "npuswarm_unplaced_replicas",
            "Replicas that could not be placed, by reason.",
            labels=["namespace", "name", "reason"],
        )
        last_success = GaugeMetricFamily(
            "npuswarm_last_successful_reconcile_timestamp_seconds",
            "Unix time of the last successful reconcile of a ModelDeployment.",
            labels=["namespace", "name"],
        )
        counts = dict.fromkeys(PHASES, 0)
        if view is not None:
            for (node, state), value in sorted(view.npus.items()):
                npus.add_metric([node, state], value)
            for key, replicas in sorted(view.deployments.items()):
                namespace, name = split_key(key)
                counts[replicas.phase] = counts.get(replicas.phase, 0) + 1
                for metric, value in (
                    ("npuswarm_replicas_desired", replicas.desired),
                    ("npuswarm_replicas_placed", replicas.placed),
                    ("npuswarm_replicas_ready", replicas.ready),
                ):
                    per_deployment[metric].add_metric([namespace, name], value)
                for reason, count in sorted(replicas.unplaced.items()):
                    unplaced.add_metric([namespace, name, reason], count)
                last_success.add_metric([namespace, name], replicas.served_at)
        for phase, count in counts.items():
            phases.add_metric([phase], count)
        yield npus
        yield phases
        yield from per_deployment.values()
        yield unplaced
        yield last_success

    def describe(self) -> Iterator[Metric]:
        # Known names without a collect: registering must not wait for the first pass.
        return self.collect()


PHASES = ("Pending", "Progressing", "Ready", "Degraded", "Invalid")
REPLICA_GAUGES = {
    "npuswarm_replicas_desired": "Replicas a ModelDeployment asks for.",
    "npuswarm_replicas_placed": "Replicas of a ModelDeployment that have a node and NPUs.",
    "npuswarm_replicas_ready": (
        "Replicas of a ModelDeployment whose Swarm task runs the current spec."
    ),
}


@dataclass(frozen=True)
class DeploymentMetrics:
    phase: str
    desired: int
    placed: int
    ready: int
    unplaced: dict[str, int]
    served_at: float  # unix time of the last pass that served it


@dataclass(frozen=True)
class PassMetrics:
    sequence: int
    npus: dict[tuple[str, str], int]
    deployments: dict[str, DeploymentMetrics]


pass_gauges = PassCollector()
REGISTRY.register(pass_gauges)

# ModelGateways (gateway/push.py): set every pass from what was pushed.
gateway_backends = Gauge(
    "npuswarm_gateway_backends",
    "Ready backends a ModelGateway holds per served model (0: the model answers 503).",
    ["namespace", "gateway", "model"],
    registry=REGISTRY,
)
gateway_scales_from_zero = Gauge(
    "npuswarm_gateway_scales_from_zero",
    "1 for each served model a ModelGateway holds requests for while it has no replica (its "
    "deployment scales to zero): no backend is then its normal state, not a fault.",
    ["namespace", "gateway", "model"],
    registry=REGISTRY,
)
gateway_replicas_ready = Gauge(
    "npuswarm_gateway_replicas_ready",
    "Gateway replicas running and holding the pushed backends.",
    ["namespace", "gateway"],
    registry=REGISTRY,
)
gateway_load_reads_total = Counter(
    "npuswarm_gateway_load_reads_total",
    "Reads of gateway replicas' engine load (GET /load, the autoscaler) by outcome.",
    ["outcome"],
    registry=REGISTRY,
)
autoscaler_desired_replicas = Gauge(
    "npuswarm_autoscaler_desired_replicas",
    "The replica count npuswarm's autoscaler decided, per autoscaled ModelDeployment.",
    ["namespace", "name"],
    registry=REGISTRY,
)
autoscaler_observed_value = Gauge(
    "npuswarm_autoscaler_observed_value",
    "The load metric the autoscaler read, as its target reads it (per replica, or the KV "
    "cache fraction), per autoscaled ModelDeployment.",
    ["namespace", "name", "metric"],
    registry=REGISTRY,
)
autoscaler_recommended_replicas = Gauge(
    "npuswarm_autoscaler_recommended_replicas",
    "The count the load alone asks for (before stabilization and the placement cap).",
    ["namespace", "name"],
    registry=REGISTRY,
)
autoscaler_unmet_replicas = Gauge(
    "npuswarm_autoscaler_unmet_replicas",
    "Replicas the load asks for that the fleet has no NPUs for (demand beyond the fleet: the "
    "autoscaler does not ask for them).",
    ["namespace", "name"],
    registry=REGISTRY,
)
gateway_pushes_total = Counter(
    "npuswarm_gateway_pushes_total",
    "Pushes of backends to gateway replicas by outcome (success, error, or fenced: not sent "
    "because this instance does not hold the leadership lease).",
    ["outcome"],
    registry=REGISTRY,
)
status_writes_pending = Gauge(
    "npuswarm_status_writes_pending",
    "Status PATCHes handed over by passes and not yet accepted by the API server (written in "
    "the background, retried with backoff; one per object, the newest).",
    registry=REGISTRY,
)
events_pending = Gauge(
    "npuswarm_events_pending",
    "Kubernetes Events handed over by passes and not yet posted (posted after every waiting "
    "status write).",
    registry=REGISTRY,
)
gateway_held_writes = Gauge(
    "npuswarm_gateway_held_writes",
    "Writes the last pass held back because a gateway may still list the replica they stop "
    "(made by the pass after the gateway accepts a state without it).",
    registry=REGISTRY,
)


class NodeValidationCollector:
    """npuswarm_node_validation{node,check}: 1 passed, 0 failed, per check of each node's last
    validation verdict (nodehealth/runner.py sets the source; no source, no series)."""

    def __init__(self) -> None:
        self.source: Callable[[], list[tuple[str, str, bool]]] | None = None

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "npuswarm_node_validation",
            "Last node validation probe per node and check: 1 passed, 0 failed.",
            labels=["node", "check"],
        )
        source = self.source
        for node, check, ok in source() if source is not None else []:
            family.add_metric([node, check], 1 if ok else 0)
        yield family

    def describe(self) -> Iterator[Metric]:
        return self.collect()


node_validation = NodeValidationCollector()
REGISTRY.register(node_validation)


class NpuHealthCollector:
    """Per NPU, from the last `npu-smi info` read on its node (nodehealth/runner.py sets the
    source): npuswarm_npu_healthy, npuswarm_npu_holds_replica. What npu-smi reads of an NPU
    (HBM, temperature, ...) each node's agent serves itself (NpuExporterCollector)."""

    def __init__(self) -> None:
        self.source: Callable[[], list[tuple[str, int, bool, bool]]] | None = None

    def collect(self) -> Iterator[Metric]:
        healthy = GaugeMetricFamily(
            "npuswarm_npu_healthy",
            "1 when npu-smi reads the NPU's health as OK or Warning, 0 otherwise.",
            labels=["node", "npu"],
        )
        holds = GaugeMetricFamily(
            "npuswarm_npu_holds_replica",
            "1 when a replica of this installation holds the NPU.",
            labels=["node", "npu"],
        )
        source = self.source
        for node, npu, ok, held in source() if source is not None else []:
            healthy.add_metric([node, str(npu)], 1 if ok else 0)
            holds.add_metric([node, str(npu)], 1 if held else 0)
        yield healthy
        yield holds

    def describe(self) -> Iterator[Metric]:
        return self.collect()


npu_health = NpuHealthCollector()
REGISTRY.register(npu_health)


class NodeAgentCollector:
    """npuswarm_node_agent_up{node}: 1 when the node's agent answered the last read, 0 when it
    did not (the node's health is then unknown: nothing moves for it). nodehealth/runner.py
    sets the source."""

    def __init__(self) -> None:
        self.source: Callable[[], list[tuple[str, bool]]] | None = None

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "npuswarm_node_agent_up",
            "1 when the node agent answered the operator's last read, 0 otherwise.",
            labels=["node"],
        )
        source = self.source
        for node, up in source() if source is not None else []:
            family.add_metric([node], 1 if up else 0)
        yield family

    def describe(self) -> Iterator[Metric]:
        return self.collect()


node_agent_up = NodeAgentCollector()
REGISTRY.register(node_agent_up)


# Huawei's npu-exporter names (MindCluster), so Ascend dashboards read npuswarm's readings:
# (name, help, what of a reading). docs/monitoring.md has the mapping.
NPU_EXPORTER_LABELS = ["id", "model_name", "pcie_bus_info", "node"]
NPU_EXPORTER_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("npu_chip_info_hbm_used_memory", "HBM in use (MB), from npu-smi info.", "hbm_used_mb"),
    ("npu_chip_info_hbm_total_memory", "HBM size (MB), from npu-smi info.", "hbm_total_mb"),
    ("npu_chip_info_temperature", "Chip temperature (C), from npu-smi info.", "temperature_c"),
    ("npu_chip_info_power", "Chip power (W), from npu-smi info.", "power_w"),
    ("npu_chip_info_utilization", "AI Core use (%), from npu-smi info.", "aicore_percent"),
)


class NpuExporterCollector:
    """Per NPU of a node agent's last reading, under npu-exporter's names and labels
    (``vdie_id`` and the pod labels are not read: left out). Served by each agent
    (nodehealth/agent.py sets the source: (node, reading, RoCE link) triples), not by the
    operator: its scrape would grow with every NPU of the fleet (docs/performance.md)."""

    def __init__(self) -> None:
        self.source: Callable[[], list[tuple[str, NpuReading, RoceLink | None]]] | None = None

    def collect(self) -> Iterator[Metric]:
        source = self.source
        readings = source() if source is not None else []
        health = GaugeMetricFamily(
            "npu_chip_info_health_status",
            "1 when npu-smi reads the chip's health as OK, 0 otherwise (npu-exporter's rule).",
            labels=NPU_EXPORTER_LABELS,
        )
        for node, reading, _ in readings:
            health.add_metric(_exporter_labels(node, reading), 1 if reading.health == "OK" else 0)
        yield health
        for name, text, attribute in NPU_EXPORTER_GAUGES:
            family = GaugeMetricFamily(name, text, labels=NPU_EXPORTER_LABELS)
            for node, reading, _ in readings:
                value = getattr(reading, attribute)
                if value is not None:
                    family.add_metric(_exporter_labels(node, reading), float(value))
            yield family
        link = GaugeMetricFamily(
            "npu_chip_info_link_status",
            "1 when hccn_tool reads the NPU's RoCE link UP, 0 otherwise.",
            labels=NPU_EXPORTER_LABELS,
        )
        network = GaugeMetricFamily(
            "npu_chip_info_network_status",
            "1 when hccn_tool reads the NPU's net health Success or Init, 0 otherwise.",
            labels=NPU_EXPORTER_LABELS,
        )
        for node, reading, roce in readings:
            if roce is not None:
                link.add_metric(_exporter_labels(node, reading), 1 if roce.link == "UP" else 0)
                healthy = roce.net_health in NET_HEALTHY
                network.add_metric(_exporter_labels(node, reading), 1 if healthy else 0)
        yield link
        yield network
        yield from _error_codes(readings)

    def describe(self) -> Iterator[Metric]:
        return self.collect()


# npu-exporter serves an NPU's first 10 DCMI error codes as npu_chip_info_error_code and
# npu_chip_info_error_code_1 .. _9, in decimal, with no series when there is no error.
ERROR_CODE_SERIES = 10


def _error_codes(
    readings: list[tuple[str, NpuReading, RoceLink | None]],
) -> Iterator[Metric]:
    families = [
        GaugeMetricFamily(
            "npu_chip_info_error_code" + (f"_{index}" if index else ""),
            f"Error code {index + 1} of the NPU as npu-smi -t health reports it (decimal; "
            "convert to hex for the fault tables); no series when there is none.",
            labels=NPU_EXPORTER_LABELS,
        )
        for index in range(ERROR_CODE_SERIES)
    ]
    for node, reading, _ in readings:
        codes = reading.fault.codes if reading.fault is not None else ()
        for family, code in zip(families, codes[:ERROR_CODE_SERIES], strict=False):
            family.add_metric(_exporter_labels(node, reading), float(int(code, 16)))
    yield from families


def _exporter_labels(node: str, reading: NpuReading) -> list[str]:
    return [str(reading.npu), reading.name, reading.bus_id, node]
