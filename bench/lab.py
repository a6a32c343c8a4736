#!/usr/bin/env python3
"""npuswarm on the real multi-node lab, against raw Docker: python bench/lab.py --help

Brings up the Swarm lab (hack/lib/swarmlab.py: 3 dockerds in network namespaces, 8 fake NPUs
each, the fake vLLM image), a real kube-apiserver (hack/lib/controlplane.py) with npuswarm's CRD
and RBAC, and the checked-out operator (`npuswarm run --standalone`, default NPUSWARM_*
settings except a short lost-node grace) pointed at the lab's manager. Then, from the
outside only (the lab's own task list, never the operator's status):

  starts      N single-NPU replicas (N = 1, 8, 24): a script doing raw `docker service
              create` of the very specs npuswarm renders, against `kubectl apply` of N
              ModelDeployments; each until every task is `running`; alternated, repeated
  rolling     a changed env var rolled over 8 replicas of one ModelDeployment
              (maxUnavailable 1), against 8 x one replica's own start time
  node loss   node3's dockerd SIGKILLed: until every replica it held runs on another node,
              against grace + 10 s

Every wait has a deadline and is reported as "not reached in X s" when it passes. Results go
to bench/results/lab-<checkout>-<time>.json; ``--report docs/performance.md`` also rewrites
that page's lab block, ``--from-results`` only rewrites it from the newest saved result.
Needs root (the lab) and the binaries of hack/build-controlplane (NPUSWARM_CACHE).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "hack" / "lib"))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import controlplane  # noqa: E402
import localrun  # noqa: E402
import swarmlab  # noqa: E402
from fleet import (  # noqa: E402
    RESULTS,
    Kube,
    checkout,
    machine,
    replace_block,
)
from localrun import free_port, operator_command, operator_env, stop_process  # noqa: E402
from npuswarm.api import labels  # noqa: E402
from npuswarm.api.deployment import ModelDeployment  # noqa: E402
from npuswarm.core.npus import parse_npu_ids  # noqa: E402
from npuswarm.core.placement import Assignment  # noqa: E402
from npuswarm.core.render import render_service  # noqa: E402

LAB_NAME = os.environ.get("NPUSWARM_BENCH_LAB_NAME", "lbench")
NAMESPACE = "bench"
NETWORK = "bench-net"
RAW_LABEL = "npuswarm-bench/raw"
NODE_LABEL = "npuswarm-bench/node"
NODES, NPUS = 3, 8
SIZES = (1, 8, 24)
GRACE_SECONDS = 10.0
POLL = 0.2  # seconds between two looks at the lab; both sides are timed with it
START_DEADLINE = 180.0
GONE_DEADLINE = 120.0
ROLL_DEADLINE = 300.0
LOSS_DEADLINE = 120.0
TARGET_RATIO = 1.1


# --- waiting ----------------------------------------------------------------------------------


class Missed(Exception):
    """A wait passed its deadline; the message is what the report shows."""


def wait_until(condition: Callable[[], Any], what: str, timeout: float) -> Any:
    """Poll ``condition`` every POLL s until it returns something truthy; return that, or
    raise Missed("not reached in X s")."""
    try:
        return localrun.wait_for(condition, what, timeout, POLL, retry=())
    except localrun.ToolError:
        raise Missed(f"{what}: not reached in {timeout:g} s") from None


# --- the specs ------------------------------------------------------------------------------------


def md_spec(name: str, **extra: Any) -> dict[str, Any]:
    """One NPU per replica, the fake vLLM of the lab tests, their fast health checks."""
    spec: dict[str, Any] = {
        "image": swarmlab.IMAGE,
        "model": f"/models/{name}",
        "npusPerReplica": 1,
        "engine": {"port": 8000},
        "healthCheck": {"startPeriodSeconds": 20, "intervalSeconds": 1, "timeoutSeconds": 2},
        "network": {"name": NETWORK, "endpointMode": "dnsrr"},
        "restartPolicy": {"delaySeconds": 1},
    }
    spec.update(extra)
    return spec


def manifest(name: str, **extra: Any) -> dict[str, Any]:
    return {
        "apiVersion": "npuswarm.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": md_spec(name, **extra),
    }


def names(count: int) -> list[str]:
    return [f"md-{i:02d}" for i in range(count)]


def raw_spec(item: dict[str, Any], node_id: str, npus: frozenset[int]) -> dict[str, Any]:
    """What npuswarm renders for this replica, minus npuswarm's labels (the running operator
    must see a foreign service, not an orphan of its own to sweep)."""
    md = ModelDeployment.model_validate({**item, "metadata": {**item["metadata"], "uid": "raw"}})
    assignment = Assignment(deployment=md.key, slot="0", node_id=node_id, npus=npus, kept=False)
    spec = render_service(md, assignment)
    container = spec["TaskTemplate"]["ContainerSpec"]
    for owner in (spec, container):
        owner["Labels"] = {
            k: v for k, v in owner["Labels"].items() if not k.startswith(labels.PREFIX)
        }
    spec["Labels"][RAW_LABEL] = "1"
    spec["Name"] = f"raw-{spec['Name']}"
    return spec


def swarm_time(stamp: str) -> float:
    """A Swarm timestamp (RFC 3339 with nanoseconds) as seconds since the epoch."""
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    seconds = datetime.fromisoformat(whole).replace(tzinfo=UTC).timestamp()
    return seconds + float(f"0.{fraction or '0'}")


def fill_placement(node_ids: list[str], count: int) -> list[tuple[str, frozenset[int]]]:
    """Node by node, NPU by NPU: where raw replicas go when npuswarm has not placed them."""
    return [(node_ids[i // NPUS], frozenset({i % NPUS})) for i in range(count)]


# --- the lab, read from the manager ---------------------------------------------------------------


class Lab:
    def __init__(self, lab: swarmlab.Lab) -> None:
        self.lab = lab
        self.api = lab.client(1).api
        self.node_apis = [lab.client(k).api for k in range(1, NODES + 1)]

    def services(self, label: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.api.services(filters={"label": label})
        return found

    def running(self, label: str) -> dict[str, list[dict[str, Any]]]:
        """Service name -> its tasks in state `running` (desired running), for the services
        carrying ``label``."""
        services = {s["ID"]: s for s in self.services(label)}
        tasks = self.api.tasks(filters={"desired-state": "running"})
        result: dict[str, list[dict[str, Any]]] = {s["Spec"]["Name"]: [] for s in services.values()}
        for task in tasks:
            service = services.get(task.get("ServiceID", ""))
            if service is not None and task["Status"]["State"] == "running":
                result[service["Spec"]["Name"]].append(task)
        return result

    def all_running(self, label: str, count: int) -> bool:
        running = self.running(label)
        return len(running) == count and all(running.values())

    def quiet(self, label: str) -> bool:
        """No service with ``label`` and no container left on any node but the node agents'
        (they run for as long as the operator does)."""
        if self.services(label):
            return False
        agents = {s["ID"] for s in self.services(labels.NODE_AGENT)}
        return all(
            c["Labels"].get("com.docker.swarm.service.id") in agents
            for api in self.node_apis
            for c in api.containers()
        )

    def node_ids(self) -> list[str]:
        return [self.lab.node_id(k) for k in range(1, NODES + 1)]


# --- the operator -------------------------------------------------------------------------------


# Node checks are on by default and run a node agent from the operator's image on every NPU
# node; the manifests set its image and the admin makes the root key (docs/install.md).
ROOT_KEY = "bench-root-key-0123456789abcdef"


def agent_image(lab: swarmlab.Lab) -> str:
    """hack/build-image's image, loaded into every lab node (no registry here)."""
    built = subprocess.run(
        [str(REPO / "hack" / "build-image")], capture_output=True, text=True, check=True
    )
    tag = built.stdout.strip().splitlines()[-1]
    lab.load_image(tag)
    return tag


class Operator:
    def __init__(self, state: Path, kubeconfig: Path, docker_host: str, image: str) -> None:
        metrics_port, health_port = free_port(), free_port()
        self.health_url = f"http://127.0.0.1:{health_port}/healthz"
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.log = state / "operator.log"
        env = operator_env(
            str(kubeconfig),
            docker_host,
            metrics_port,
            {
                "NPUSWARM_LOST_NODE_GRACE_SECONDS": f"{GRACE_SECONDS:g}",
                "NPUSWARM_ROOT_KEY": ROOT_KEY,
                "NPUSWARM_AGENT_IMAGE": image,
                # The bench makes its network itself (the raw side needs it too): an admin
                # shares it, or npuswarm refuses a network it did not make for the namespace.
                "NPUSWARM_SHARED_NETWORKS": f"{NETWORK}={NAMESPACE}",
            },
        )
        argv = operator_command(self.health_url)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)

    def answers(self) -> bool:
        self.alive()
        try:
            with urllib.request.urlopen(self.health_url, timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def phases(self) -> dict[str, float]:
        """Seconds spent so far in each pass phase (npuswarm_pass_phase_seconds sums) and
        the passes run, from the operator's metrics endpoint."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            text = response.read().decode()
        found: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "npuswarm_pass_phase_seconds_sum":
                    found[sample.labels["phase"]] = sample.value
                elif sample.name == "npuswarm_pass_duration_seconds_count":
                    found["passes"] = sample.value
        return found

    def alive(self) -> bool:
        code = self.proc.poll()
        if code is not None:
            raise RuntimeError(f"the operator exited with {code}; see {self.log}")
        return True

    def stop(self) -> None:
        stop_process(self.proc)


# --- the run -----------------------------------------------------------------------------------


class Bench:
    def __init__(self, lab: Lab, kube: Kube, operator: Operator, repeat: int) -> None:
        self.lab, self.kube, self.operator, self.repeat = lab, kube, operator, repeat
        self.result: dict[str, Any] = {
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "checkout": checkout(),
            "machine": machine(),
            "lab": {"name": LAB_NAME, "nodes": NODES, "npus_per_node": NPUS},
            "settings": {
                "NPUSWARM_LOST_NODE_GRACE_SECONDS": GRACE_SECONDS,
                "NPUSWARM_SHARED_NETWORKS": f"{NETWORK}={NAMESPACE}",
                "others": "defaults (resync 30 s, task poll 5 s / 1 s busy); node agents from "
                "the operator's image with a root key, as the manifests set them",
                "poll_s": POLL,
            },
            "starts": [],
        }
        # N -> where npuswarm's last run of that size put each replica (raw runs copy it).
        self.placements: dict[int, list[tuple[str, frozenset[int]]]] = {}

    def note(self, section: str, **values: Any) -> None:
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        print(f"[lab] {section}: {shown}", flush=True)

    # -- starts ----------------------------------------------------------------------------

    def _create_raw(self, spec: dict[str, Any]) -> str:
        """`docker service create` of a rendered spec, as a person would without npuswarm."""
        created: dict[str, Any] = self.lab.api.create_service(
            spec["TaskTemplate"],
            name=spec["Name"],
            labels=spec["Labels"],
            mode=spec["Mode"],
            update_config=spec["UpdateConfig"],
            endpoint_spec=spec["EndpointSpec"],
        )
        return str(created["ID"])

    def raw(
        self, count: int, placement: list[tuple[str, frozenset[int]]], run: int
    ) -> dict[str, Any]:
        specs = [
            raw_spec(manifest(n), node, npus)
            for n, (node, npus) in zip(names(count), placement, strict=True)
        ]
        label = f"{RAW_LABEL}=1"
        row: dict[str, Any] = {"kind": "raw", "n": count, "run": run}
        started = time.monotonic()
        ids = [self._create_raw(spec) for spec in specs]
        row["creates_s"] = round(time.monotonic() - started, 2)
        try:
            wait_until(lambda: self.lab.all_running(label, count), "all running", START_DEADLINE)
            row["all_running_s"] = round(time.monotonic() - started, 2)
            created = max(swarm_time(s["CreatedAt"]) for s in self.lab.services(label))
            row["services_to_running_s"] = round(time.time() - created, 2)
        except Missed as missed:
            row["all_running_s"], row["note"] = None, str(missed)
        for service_id in ids:
            self.lab.api.remove_service(service_id)
        self.gone(label, row)
        self.note("raw", **row)
        return row

    def npuswarm(
        self, count: int, run: int
    ) -> tuple[dict[str, Any], list[tuple[str, frozenset[int]]]]:
        items = [manifest(n) for n in names(count)]
        label = f"{labels.OWNER_NAMESPACE}={NAMESPACE}"
        row: dict[str, Any] = {"kind": "npuswarm", "n": count, "run": run}
        phases_before = self.operator.phases()
        started = time.monotonic()
        self.kube.apply(items)
        applied, applied_wall = time.monotonic(), time.time()
        row["apply_s"] = round(applied - started, 2)
        placement: list[tuple[str, frozenset[int]]] = []
        try:
            wait_until(
                lambda: self.operator.alive() and self.lab.all_running(label, count),
                "all running",
                START_DEADLINE,
            )
            done, done_wall = time.monotonic(), time.time()
            row["all_running_s"] = round(done - applied, 2)
            row["from_apply_start_s"] = round(done - started, 2)
            row.update(self.breakdown(label, applied_wall, done_wall, phases_before))
            where = {
                s["Spec"]["Labels"][labels.OWNER_NAME]: (
                    s["Spec"]["Labels"][labels.NODE],
                    parse_npu_ids(s["Spec"]["Labels"][labels.NPUS]),
                )
                for s in self.lab.services(label)
            }
            placement = [where[n] for n in names(count)]
        except Missed as missed:
            row["all_running_s"], row["note"] = None, str(missed)
        self.delete(items)
        self.gone(label, row)
        self.note("npuswarm", **row)
        return row, placement

    def breakdown(
        self, label: str, applied: float, done: float, phases_before: dict[str, float]
    ) -> dict[str, Any]:
        """Where npuswarm's start went: from `kubectl apply` returning to the last service's
        creation in Swarm (the manager's own CreatedAt; same clock, same machine), from there
        to all running (Swarm's part, as for raw creates), and the operator's pass phases
        summed over the passes meanwhile (kopf's part is the rest of the first span)."""
        created = max(swarm_time(s["CreatedAt"]) for s in self.lab.services(label))
        after = self.operator.phases()
        phases = {
            phase: round(after.get(phase, 0.0) - phases_before.get(phase, 0.0), 3)
            for phase in ("waited", "observe", "plan", "gateways", "apply", "report", "passes")
        }
        return {
            "to_services_s": round(created - applied, 3),
            "services_to_running_s": round(done - created, 2),
            "phases": phases,
        }

    def delete(self, items: list[dict[str, Any]]) -> None:
        listing = json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
        self.kube.kubectl(
            "delete", "--wait=true", "--timeout=120s", "-f", "-", input=listing, timeout=150
        )

    def gone(self, label: str, row: dict[str, Any]) -> None:
        started = time.monotonic()
        try:
            wait_until(lambda: self.lab.quiet(label), "services and containers gone", GONE_DEADLINE)
            row["gone_s"] = round(time.monotonic() - started, 2)
        except Missed as missed:
            row["gone_s"], row["gone_note"] = None, str(missed)

    def starts(self) -> None:
        node_ids = self.lab.node_ids()
        # Untimed warm-up: every NPU of every node runs the image once before any figure.
        self.result["warmup"] = self.raw(NODES * NPUS, fill_placement(node_ids, NODES * NPUS), 0)
        for run in range(1, self.repeat + 1):
            for count in self.result["sizes"]:
                # Alternate who goes first, so neither side always follows the other's cleanup.
                if run % 2:
                    row, placement = self.npuswarm(count, run)
                    self.result["starts"].append(row)
                    self.result["starts"].append(
                        self.raw(count, placement or fill_placement(node_ids, count), run)
                    )
                else:
                    last = self.placements.get(count) or fill_placement(node_ids, count)
                    self.result["starts"].append(self.raw(count, last, run))
                    row, placement = self.npuswarm(count, run)
                    self.result["starts"].append(row)
                if placement:
                    self.placements[count] = placement

    # -- one replica's own start, then the rolling update -----------------------------------

    def replica_start(self, samples: int = 3) -> dict[str, Any]:
        """Raw create -> running and raw update (stop-first, a changed env) -> running of one
        replica of the rolling deployment's spec: what each step of a rollout waits for."""
        node_ids = self.lab.node_ids()
        label = f"{RAW_LABEL}=1"
        creates, updates = [], []
        for index in range(samples):
            item = manifest("roll", replicas=8)
            spec = raw_spec(_with_env(item, "1"), node_ids[1], frozenset({index}))
            started = time.monotonic()
            service_id = self._create_raw(spec)
            try:
                wait_until(lambda: self.lab.all_running(label, 1), "replica running", 60)
                creates.append(round(time.monotonic() - started, 2))
                changed = raw_spec(_with_env(item, "2"), node_ids[1], frozenset({index}))
                version = self.lab.api.inspect_service(service_id)["Version"]["Index"]
                started = time.monotonic()
                self.lab.api.update_service(
                    service_id,
                    version,
                    task_template=changed["TaskTemplate"],
                    name=changed["Name"],
                    labels=changed["Labels"],
                    mode=changed["Mode"],
                    update_config=changed["UpdateConfig"],
                    endpoint_spec=changed["EndpointSpec"],
                )
                wait_until(lambda: self.runs_env(label, "2") == 1, "updated replica running", 60)
                updates.append(round(time.monotonic() - started, 2))
            except Missed as missed:
                self.note("replica", note=str(missed))
            self.lab.api.remove_service(service_id)
            self.gone(label, {})
        figures = {
            "create_to_running_s": creates,
            "update_to_running_s": updates,
            "create_median_s": statistics.median(creates) if creates else None,
            "update_median_s": statistics.median(updates) if updates else None,
        }
        self.note("replica", **figures)
        return figures

    def runs_env(self, label: str, value: str) -> int:
        """Services with ``label`` whose running task has BENCH_ROUND=value and no running
        task of another round."""
        wanted = f"BENCH_ROUND={value}"
        count = 0
        for tasks in self.lab.running(label).values():
            envs = [t["Spec"]["ContainerSpec"].get("Env") or [] for t in tasks]
            if envs and all(wanted in env for env in envs):
                count += 1
        return count

    def rolling(self) -> None:
        section: dict[str, Any] = {"replica": self.replica_start()}
        self.result["rolling"] = section
        label = f"{labels.OWNER_NAMESPACE}={NAMESPACE}"
        item = _with_env(manifest("roll", replicas=8), "1")
        item["spec"]["updateStrategy"] = {"maxUnavailable": 1}
        self.kube.apply([item])
        try:
            wait_until(
                lambda: self.operator.alive() and self.runs_env(label, "1") == 8 and self.ready(),
                "8 replicas running and Ready",
                START_DEADLINE,
            )
            changed = _with_env(item, "2")
            started = time.monotonic()
            self.kube.apply([changed])
            applied = time.monotonic()
            progress: list[float] = []

            def done() -> bool:
                self.operator.alive()
                count = self.runs_env(label, "2")
                while len(progress) < count:
                    progress.append(round(time.monotonic() - applied, 2))
                return count == 8

            wait_until(done, "all 8 replicas on the new spec", ROLL_DEADLINE)
            section["apply_s"] = round(applied - started, 2)
            section["duration_s"] = round(time.monotonic() - applied, 2)
            section["replica_done_at_s"] = progress
            start = section["replica"]["create_median_s"]
            update = section["replica"]["update_median_s"]
            if start:
                section["ratio_to_8_starts"] = round(section["duration_s"] / (8 * start), 2)
            if update:
                section["ratio_to_8_updates"] = round(section["duration_s"] / (8 * update), 2)
        except Missed as missed:
            section["duration_s"], section["note"] = None, str(missed)
        self.delete([item])
        self.gone(label, section)
        self.note("rolling", **{k: v for k, v in section.items() if k != "replica"})

    def ready(self) -> bool:
        out = self.kube.kubectl(
            "-n", NAMESPACE, "get", "md", "roll", "-o", "jsonpath={.status.phase}"
        )
        return out.strip() == "Ready"

    # -- node loss ---------------------------------------------------------------------------

    def node_loss(self) -> None:
        section: dict[str, Any] = {"grace_s": GRACE_SECONDS, "goal_s": GRACE_SECONDS + 10}
        self.result["node_loss"] = section
        label = f"{labels.OWNER_NAMESPACE}={NAMESPACE}"
        node3 = self.lab.lab.swarm_node(3)
        spec = dict(node3["Spec"])
        spec["Labels"] = {**spec.get("Labels", {}), NODE_LABEL: "node3"}
        self.lab.api.update_node(node3["ID"], node3["Version"]["Index"], spec)
        node3_id = node3["ID"]
        # The filler, pinned to node3 and older, leaves node3 the fullest node that fits:
        # best fit puts the mover's replicas there too.
        filler = manifest("filler", replicas=4, nodeSelector={NODE_LABEL: "node3"})
        mover = manifest("mover", replicas=4)
        try:
            self.kube.apply([filler])
            wait_until(lambda: self.replicas("filler") == 4, "filler running", START_DEADLINE)
            self.kube.apply([mover])
            wait_until(lambda: self.replicas("mover") == 4, "mover running", START_DEADLINE)
            affected = sorted(self.slots_on("mover", node3_id))
            section["mover_slots_on_node3"] = affected
            if not affected:
                section["note"] = "best fit placed no mover replica on node3: nothing to lose"
                return
            killed = time.monotonic()
            self.lab.lab.kill_dockerd(3)
            down_seen: list[float] = []

            def moved() -> bool:
                self.operator.alive()
                if not down_seen and self.lab.lab.swarm_node(3)["Status"]["State"] == "down":
                    down_seen.append(round(time.monotonic() - killed, 2))
                elsewhere = self.slots_on("mover", None, exclude=node3_id)
                return set(affected) <= elsewhere

            try:
                wait_until(moved, "every affected replica running on another node", LOSS_DEADLINE)
                section["replaced_s"] = round(time.monotonic() - killed, 2)
                section["met"] = section["replaced_s"] <= section["goal_s"]
            except Missed as missed:
                section["replaced_s"], section["note"] = None, str(missed)
            section["node_down_seen_s"] = down_seen[0] if down_seen else None
            section["moved_to"] = sorted(
                {
                    self.hostname(t["NodeID"])
                    for tasks in self.lab.running(label).values()
                    for t in tasks
                    if t["NodeID"] != node3_id
                }
            )
        finally:
            with contextlib.suppress(swarmlab.LabError):
                self.lab.lab.start_dockerd(3)
            section["node3_ready_again_s"] = round(self.lab.lab.wait_node_state(3, "ready", 60), 2)
            self.delete([filler, mover])
            self.gone(label, section)
            self.note("node loss", **section)

    def replicas(self, owner: str) -> int:
        """Replicas of ``owner`` with a running task."""
        label = f"{labels.OWNER_NAME}={owner}"
        return sum(1 for tasks in self.lab.running(label).values() if tasks)

    def slots_on(self, owner: str, node_id: str | None, exclude: str | None = None) -> set[str]:
        label = f"{labels.OWNER_NAME}={owner}"
        slots = set()
        services = {s["Spec"]["Name"]: s for s in self.lab.services(label)}
        for name, tasks in self.lab.running(label).items():
            for task in tasks:
                if (node_id is None or task["NodeID"] == node_id) and task["NodeID"] != exclude:
                    slots.add(services[name]["Spec"]["Labels"][labels.REPLICA])
        return slots

    def hostname(self, node_id: str) -> str:
        return str(self.lab.api.inspect_node(node_id)["Description"]["Hostname"])


def _with_env(item: dict[str, Any], value: str) -> dict[str, Any]:
    changed = json.loads(json.dumps(item))
    changed["spec"]["engine"]["env"] = {"BENCH_ROUND": value}
    return changed


# --- output ---------------------------------------------------------------------------------


def _s(value: Any) -> str:
    return "-" if value is None else f"{value} s"


def summary(result: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Per N: medians of both sides and their ratio."""
    out: dict[int, dict[str, Any]] = {}
    for count in result.get("sizes", SIZES):
        rows = [r for r in result["starts"] if r["n"] == count]
        raw = [r["all_running_s"] for r in rows if r["kind"] == "raw" and r["all_running_s"]]
        ours = [r for r in rows if r["kind"] == "npuswarm" and r["all_running_s"]]
        entry: dict[str, Any] = {"runs": len(ours)}
        if raw and ours:
            entry["raw_s"] = round(statistics.median(raw), 2)
            entry["npuswarm_s"] = round(statistics.median(r["all_running_s"] for r in ours), 2)
            entry["npuswarm_from_apply_start_s"] = round(
                statistics.median(r["from_apply_start_s"] for r in ours), 2
            )
            entry["ratio"] = round(entry["npuswarm_s"] / entry["raw_s"], 2)
            entry["ratio_from_apply_start"] = round(
                entry["npuswarm_from_apply_start_s"] / entry["raw_s"], 2
            )
        out[count] = entry
    return out


def breakdown_table(result: dict[str, Any]) -> list[str]:
    """Each npuswarm start split: `kubectl apply` returning -> its last service created in
    Swarm, and that -> all running (raw's same span beside it); the pass phases summed."""
    ours = [r for r in result["starts"] if r["kind"] == "npuswarm" and "phases" in r]
    if not ours:
        return []
    lines = [
        "",
        "**Where a start goes** (npuswarm's runs): apply -> services is kopf's watch, the "
        "trigger's wait and the passes; services -> running is Swarm's part, beside the raw "
        "run's same span; the phases are the operator's `npuswarm_pass_phase_seconds` summed "
        "over the passes meanwhile.",
        "",
        "| N | run | apply -> services | services -> running | raw: services -> running "
        "| passes | waited | observe | plan | apply |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in ours:
        raw = next(
            (
                r
                for r in result["starts"]
                if (r["kind"], r["n"], r["run"]) == ("raw", row["n"], row["run"])
            ),
            {},
        )
        phases = row["phases"]
        lines.append(
            f"| {row['n']} | {row['run']} | {row['to_services_s']} s "
            f"| {row['services_to_running_s']} s | {_s(raw.get('services_to_running_s'))} "
            f"| {phases['passes']:g} | {phases['waited']} s | {phases['observe']} s "
            f"| {phases['plan']} s | {phases['apply']} s |"
        )
    return lines


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Run {result['started']}, checkout `{result['checkout']}`, "
        f"{result.get('duration_s', '-')} s in all; lab {NODES} nodes x {NPUS} NPUs; "
        f"`NPUSWARM_LOST_NODE_GRACE_SECONDS={GRACE_SECONDS:g}`, every other setting default "
        "(resync 30 s).",
        "",
        "**Starts**: seconds until every task of N single-NPU replicas is `running` "
        "(raw: from the script's first `docker service create`; npuswarm: from `kubectl apply` "
        "returning, and from its start).",
        "",
        "| N | run | raw | npuswarm | npuswarm from apply start | ratio |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for count in result.get("sizes", SIZES):
        for run in sorted({r["run"] for r in result["starts"]}):
            raw = next(
                (
                    r
                    for r in result["starts"]
                    if (r["n"], r["run"], r["kind"]) == (count, run, "raw")
                ),
                {},
            )
            ours = next(
                (
                    r
                    for r in result["starts"]
                    if (r["n"], r["run"], r["kind"]) == (count, run, "npuswarm")
                ),
                {},
            )
            ratio = (
                f"{ours['all_running_s'] / raw['all_running_s']:.2f}"
                if ours.get("all_running_s") and raw.get("all_running_s")
                else "-"
            )
            lines.append(
                f"| {count} | {run} | {raw.get('note') or _s(raw.get('all_running_s'))} "
                f"| {ours.get('note') or _s(ours.get('all_running_s'))} "
                f"| {_s(ours.get('from_apply_start_s'))} | {ratio} |"
            )
    lines += [
        "",
        "| N | raw (median) | npuswarm (median) | ratio | from apply start: ratio | "
        f"within {TARGET_RATIO}x |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for count, entry in summary(result).items():
        if "ratio" not in entry:
            lines.append(f"| {count} | - | - | - | - | not measured |")
            continue
        verdict = "met" if entry["ratio"] <= TARGET_RATIO else "missed"
        lines.append(
            f"| {count} | {entry['raw_s']} s | {entry['npuswarm_s']} s | {entry['ratio']} "
            f"| {entry['ratio_from_apply_start']} | {verdict} |"
        )
    lines += breakdown_table(result)
    roll = result.get("rolling", {})
    replica = roll.get("replica", {})
    lines += [
        "",
        "**Rolling update** of 8 one-NPU replicas (maxUnavailable 1, a changed env var), "
        "from `kubectl apply` returning until all 8 run the new spec:",
        "",
        "| one replica: create -> running | one replica: update -> running | rollout of 8 "
        "| replicas done at | rollout / (8 x create) | rollout / (8 x update) |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| {replica.get('create_to_running_s')} s (median {replica.get('create_median_s')}) "
        f"| {replica.get('update_to_running_s')} s (median {replica.get('update_median_s')}) "
        f"| {roll.get('note') or _s(roll.get('duration_s'))} "
        f"| {roll.get('replica_done_at_s', '-')} s "
        f"| {roll.get('ratio_to_8_starts', '-')} | {roll.get('ratio_to_8_updates', '-')} |",
    ]
    loss = result.get("node_loss", {})
    met = loss.get("met")
    lines += [
        "",
        "**Node loss**: node3's dockerd SIGKILLed; seconds from the kill until every replica "
        "it held runs on another node:",
        "",
        "| grace | manager sees node3 down | all re-placed | goal (grace + 10 s) | moved to |",
        "| --- | --- | --- | --- | --- |",
        f"| {loss.get('grace_s')} s | {_s(loss.get('node_down_seen_s'))} "
        f"| {loss.get('note') or _s(loss.get('replaced_s'))} "
        f"| {_s(loss.get('goal_s'))}: {'met' if met else 'missed' if met is False else '-'} "
        f"| {', '.join(loss.get('moved_to', [])) or '-'} |",
        "",
        f"Machine: `{json.dumps(result['machine'], sort_keys=True)}`",
        "",
    ]
    return "\n".join(lines)


def newest_result() -> dict[str, Any]:
    found = sorted(RESULTS.glob("lab-*.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no lab-*.json in {RESULTS}: run `python bench/lab.py` first")
    loaded: dict[str, Any] = json.loads(found[-1].read_text())
    return loaded


# --- main ---------------------------------------------------------------------------------------


def execute(
    repeat: int, state: Path, sizes: tuple[int, ...] = SIZES, only_starts: bool = False
) -> dict[str, Any]:
    wall = time.monotonic()
    with swarmlab.lab_session(nodes=NODES, npus=NPUS, name=LAB_NAME) as lab:
        lab_view = Lab(lab)
        lab_view.api.create_network(NETWORK, driver="overlay", attachable=True)
        with controlplane.running(state / "controlplane") as plane:
            kube = Kube(plane)
            kubeconfig = kube.install(state)
            kube.kubectl("create", "namespace", NAMESPACE)
            operator = Operator(state, kubeconfig, lab.endpoint, agent_image(lab))
            bench = Bench(lab_view, kube, operator, repeat)
            bench.result["sizes"] = list(sizes)
            try:
                wait_until(operator.answers, "the operator's liveness endpoint", 60)
                bench.starts()
                if not only_starts:
                    bench.rolling()
                    bench.node_loss()
            except Exception as error:
                # A broken run still leaves its figures so far, and says why it stopped.
                bench.result["error"] = f"{type(error).__name__}: {error}"
                print(f"[lab] stopped: {bench.result['error']}", file=sys.stderr)
            finally:
                operator.stop()
    bench.result["duration_s"] = round(time.monotonic() - wall, 1)
    return bench.result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=2, help="runs of each size per side")
    parser.add_argument("--report", type=Path, help="also rewrite this page's lab block")
    parser.add_argument(
        "--from-results", action="store_true", help="only rewrite --report from the newest result"
    )
    parser.add_argument("--keep", action="store_true", help="keep the state folder (logs)")
    parser.add_argument(
        "--sizes", default=",".join(map(str, SIZES)), help="N of the starts, e.g. 1,8"
    )
    parser.add_argument(
        "--only-starts", action="store_true", help="skip the rolling update and the node loss"
    )
    args = parser.parse_args(argv)
    sizes = tuple(int(n) for n in args.sizes.split(","))
    if args.from_results:
        if args.report is None:
            parser.error("--from-results needs --report PAGE")
        replace_block(args.report, "lab", markdown(newest_result()))
        return 0
    state = Path(tempfile.mkdtemp(prefix="npuswarm-labbench-"))
    try:
        result = execute(args.repeat, state, sizes, args.only_starts)
    finally:
        if args.keep:
            print(f"[lab] state and logs kept in {state}", file=sys.stderr)
        else:
            shutil.rmtree(state, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M")
    out = RESULTS / f"lab-{result['checkout'].replace('+', '_')}-{stamp}.json"
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(markdown(result))
    print(f"[lab] {out}")
    if args.report is not None:
        replace_block(args.report, "lab", markdown(result))
    return 1 if result.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
