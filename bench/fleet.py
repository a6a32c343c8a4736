#!/usr/bin/env python3
"""The operator at fleet size, end to end and black box: python bench/fleet.py --help

Starts a real kube-apiserver (hack/lib/controlplane.py) with npuswarm's CRD and RBAC, the
synthetic Swarm manager (bench/enginesim.py) with N nodes of 8 NPUs, creates M
ModelDeployments of one NPU each, then starts whatever operator is checked out
(`npuswarm run --standalone`, default NPUSWARM_* settings, its ServiceAccount's token) and
measures, from the outside only:

  converge    operator start -> a service for every deployment, every task running,
              every ModelDeployment Ready
  steady      over --window seconds: operator CPU (% of one core, /proc/<pid>/stat),
              Engine list calls and writes per minute (the sim's counters), reconciles
  new         a newly applied ModelDeployment -> its service in the sim
  restore     a service removed by hand -> a service for that deployment again
  update      k changed deployments -> Engine writes until all k run the new spec
  memory      operator VmRSS / VmHWM with all M deployments known

Every phase has a deadline; one that is missed is reported as "not reached in X s". Results
go to a JSON file (bench/results/ by default) and a markdown table on stdout;
``--report docs/performance.md`` rewrites that page's fleet tables from every JSON file in
bench/results/ without running anything.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "hack" / "lib"))

import controlplane  # noqa: E402
import localrun  # noqa: E402
from localrun import free_port, operator_command, operator_env, stop_process  # noqa: E402

NAMESPACE = "fleet"
OPERATOR_NAMESPACE = "npuswarm-system"
OWNER_NAME = "npuswarm.io/owner-name"
OWNER_NAMESPACE = "npuswarm.io/owner-namespace"
RESULTS = REPO / "bench" / "results"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --- small tools -----------------------------------------------------------------------------


def wait(condition: Callable[[], Any], timeout: float, interval: float) -> float | None:
    """Seconds until ``condition`` held, or None when ``timeout`` passed first."""
    started = time.monotonic()
    try:
        localrun.wait_for(condition, "", timeout, interval, retry=())
    except localrun.ToolError:
        return None
    return time.monotonic() - started


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime 14 and stime 15 (proc(5)).
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_kib(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def checkout() -> str:
    """Which operator was measured: the commit, and whether the tree had changes."""

    def git(*args: str) -> str:
        result = subprocess.run(
            ["git", "-C", str(REPO), *args], check=False, capture_output=True, text=True
        )
        return result.stdout.strip()

    # The last commit that touched the operator, so bench-only commits do not look new.
    commit = git("log", "-1", "--format=%h", "--abbrev=12", "--", "operator")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "operator"))
    return commit + ("+changes" if dirty else "")


class Sim:
    """The enginesim process and its /sim/ control endpoints."""

    def __init__(self, nodes: int, log: Path, agent_port: int) -> None:
        self.port = free_port()
        self.agent_port = agent_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.docker_host = f"tcp://127.0.0.1:{self.port}"
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(REPO / "bench" / "enginesim.py"),
                    "--nodes",
                    str(nodes),
                    "--port",
                    str(self.port),
                    "--agent-port",
                    str(agent_port),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def call(self, path: str, method: str = "GET", timeout: float = 30) -> Any:
        request = urllib.request.Request(self.url + path, method=method)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/_ping", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def services(self) -> list[dict[str, Any]]:
        return [
            s for s in self.call("/sim/services") if s["Labels"].get(OWNER_NAMESPACE) == NAMESPACE
        ]

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("/sim/stats")
        return result

    def set_npu_health(self, node: str, npu: int, state: str) -> None:
        self.call(f"/sim/nodes/{node}/npus/{npu}/health?state={state}", method="POST")

    def stop(self) -> None:
        stop_process(self.proc)


def scrape(url: str) -> str | None:
    """The operator's /metrics text; None when it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    return text


def metric_sums(url: str) -> dict[str, float]:
    """Totals of the operator's counters that tell passes and Engine calls apart."""
    text = scrape(url)
    if text is None:
        return {}
    sums: dict[str, float] = {}
    pattern = re.compile(
        r"^(controller_runtime_reconcile_total|npuswarm_swarm_api_calls_total"
        r"|npuswarm_gc_seconds_total)"
        r"\{([^}]*)\}\s+([0-9.e+-]+)$"
    )
    for line in text.splitlines():
        match = pattern.match(line)
        if match:
            name, labels, value = match.groups()
            label = re.search(r'(?:result|operation|generation)="([^"]*)"', labels)
            key = f"{name}{{{label.group(1) if label else ''}}}"
            sums[key] = sums.get(key, 0.0) + float(value)
    return sums


def writes_pending(url: str) -> float | None:
    """Status writes and Events the operator has not yet sent (npuswarm_status_writes_pending
    + npuswarm_events_pending); None when /metrics does not answer."""
    text = scrape(url)
    if text is None:
        return None
    names = ("npuswarm_status_writes_pending ", "npuswarm_events_pending ")
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(names)
    )


def agents_up(url: str) -> dict[str, int]:
    """npuswarm_node_agent_up: how many nodes' agents answered the last read, of how many."""
    text = scrape(url)
    if text is None:
        return {}
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("npuswarm_node_agent_up{")
    ]
    return {"up": sum(1 for v in values if v == 1), "nodes": len(values)}


def admin_settings(agent_port: int) -> dict[str, str]:
    """What an admin sets for node checks (docs/node-health.md): the agents' image (the
    operator's own; the sim runs no image) and a root key; the agent port is the sim's."""
    return {
        "NPUSWARM_AGENT_IMAGE": "sim/npuswarm:bench",
        "NPUSWARM_ROOT_KEY": "fleet-benchmark-root-key-" + "0" * 24,
        "NPUSWARM_AGENT_PORT": str(agent_port),
    }


def unhealthy_grace(settings: dict[str, str]) -> float:
    """The operator's NPU unhealthy grace: the run's setting, else the product's default."""
    given = settings.get("NPUSWARM_NPU_UNHEALTHY_GRACE_SECONDS")
    if given is not None:
        return float(given)
    from npuswarm.settings import Settings

    return float(Settings.model_fields["npu_unhealthy_grace_seconds"].default)


SERVICE_WRITES = ("POST /services/create", "POST /services/{id}/update", "DELETE /services/{id}")


# --- the Kubernetes side -----------------------------------------------------------------------


@dataclass
class Kube:
    plane: controlplane.ControlPlane

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 600) -> str:
        argv = [str(self.plane.kubectl), "--kubeconfig", str(self.plane.kubeconfig), *args]
        result = subprocess.run(
            argv, check=False, input=input, capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def install(self, state: Path) -> Path:
        """CRD, RBAC and the operator's ServiceAccount; returns that account's kubeconfig."""
        self.kubectl("apply", "-k", str(REPO / "manifests"))
        self.kubectl(
            "wait",
            "--for=condition=Established",
            "crd/modeldeployments.npuswarm.io",
            "--timeout=60s",
        )
        token = self.kubectl(
            "-n", OPERATOR_NAMESPACE, "create", "token", "npuswarm", "--duration=4h"
        ).strip()
        path = state / "operator.kubeconfig"
        path.write_text(
            controlplane._kubeconfig(  # one kubeconfig writer for the repo
                self.plane.server, self.plane.ca_file.read_bytes(), "npuswarm", token
            )
        )
        path.chmod(0o600)
        self.kubectl("create", "namespace", NAMESPACE)
        return path

    def apply(self, items: list[dict[str, Any]], verb: str = "apply") -> None:
        manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
        extra = ["--save-config"] if verb == "create" else []
        self.kubectl(verb, *extra, "-f", "-", input=manifest)

    def phases(self) -> dict[str, str]:
        out = self.kubectl(
            "-n",
            NAMESPACE,
            "get",
            "md",
            "-o",
            'jsonpath={range .items[*]}{.metadata.name}={.status.phase}{"\\n"}{end}',
        )
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


class PhaseWatch:
    """Every ModelDeployment's phase as the API server streams it (one watch): "all Ready"
    is timed when it happens. A kubectl LIST of 2,000 objects every 10 s cost the API
    server the CPU the operator needs and read the moment up to 10 s late."""

    def __init__(self, plane: controlplane.ControlPlane) -> None:
        import kubernetes

        client = kubernetes.config.new_client_from_config(str(plane.kubeconfig))
        self.api = kubernetes.client.CustomObjectsApi(client)
        self.phases: dict[str, str] = {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._follow, name="phase-watch", daemon=True)
        self.thread.start()

    def _follow(self) -> None:
        import kubernetes

        while not self.stopped.is_set():
            try:
                stream = kubernetes.watch.Watch().stream(
                    self.api.list_namespaced_custom_object,
                    "npuswarm.io",
                    "v1alpha1",
                    NAMESPACE,
                    "modeldeployments",
                    timeout_seconds=60,
                )
                for event in stream:
                    found = event["object"]
                    name = found["metadata"]["name"]
                    if event["type"] == "DELETED":
                        self.phases.pop(name, None)
                    else:
                        self.phases[name] = (found.get("status") or {}).get("phase", "")
                    if self.stopped.is_set():
                        return
            except Exception:  # a dropped watch starts again (its first events: every object)
                self.stopped.wait(1)

    def all_ready(self, count: int) -> bool:
        phases = dict(self.phases)
        return len(phases) >= count and all(p == "Ready" for p in phases.values())

    def close(self) -> None:
        self.stopped.set()


def deployment(name: str, image: str = "sim/vllm:bench") -> dict[str, Any]:
    return {
        "apiVersion": "npuswarm.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "image": image,
            "model": f"/models/{name}",
            "npusPerReplica": 1,
            "replicas": 1,
            "mode": "Replicated",
        },
    }


def names(count: int) -> list[str]:
    return [f"md-{i:05d}" for i in range(count)]


# --- the run -------------------------------------------------------------------------------------


@dataclass
class Options:
    nodes: int
    deployments: int
    window: float
    timeout: float
    phase_timeout: float
    changed: int
    out: Path
    keep: bool
    # NPUSWARM_* settings that differ from the product's defaults (reported with the figures).
    settings: dict[str, str] = field(default_factory=dict)


class Run:
    def __init__(self, options: Options, state: Path) -> None:
        self.o = options
        self.state = state
        self.result: dict[str, Any] = {
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "checkout": checkout(),
            "machine": machine(),
            "params": {
                "nodes": options.nodes,
                "deployments": options.deployments,
                "window_s": options.window,
                "timeout_s": options.timeout,
                "phase_timeout_s": options.phase_timeout,
                "changed": options.changed,
                "settings": dict(options.settings),
                # Set as an admin would for node checks; not departures from the defaults.
                "admin_settings": [
                    "NPUSWARM_AGENT_IMAGE",
                    "NPUSWARM_ROOT_KEY",
                    "NPUSWARM_AGENT_PORT",
                ],
            },
            "phases": {},
        }
        self.operator: subprocess.Popen[bytes] | None = None

    def note(self, phase: str, **values: Any) -> None:
        self.result["phases"].setdefault(phase, {}).update(values)
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        print(f"[fleet] {phase}: {shown}", flush=True)

    def missed(self, phase: str, what: str, timeout: float) -> None:
        self.note(phase, **{what: None, f"{what}_note": f"not reached in {timeout:g} s"})

    def execute(self) -> dict[str, Any]:
        wall = time.monotonic()
        self.agent_port = free_port()
        sim = Sim(self.o.nodes, self.state / "enginesim.log", self.agent_port)
        try:
            if wait(sim.ready, 30, 0.1) is None:
                raise RuntimeError(f"enginesim did not answer: {self.state / 'enginesim.log'}")
            with controlplane.running(self.state / "controlplane") as plane:
                kube = Kube(plane)
                kubeconfig = kube.install(self.state)
                started = time.monotonic()
                kube.apply([deployment(n) for n in names(self.o.deployments)], verb="create")
                self.note("setup", deployments_created_s=round(time.monotonic() - started, 1))
                try:
                    self.measure(sim, kube, kubeconfig)
                except Exception as error:
                    # A broken run still leaves its figures so far, and says why it stopped.
                    self.result["error"] = f"{type(error).__name__}: {error}"
                    log = self.state / "operator.log"
                    if log.exists():
                        print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
                finally:
                    if self.operator is not None:
                        stop_process(self.operator)
        finally:
            sim.stop()
        self.result["duration_s"] = round(time.monotonic() - wall, 1)
        return self.result

    def start_operator(self, sim: Sim, kubeconfig: Path) -> tuple[int, str]:
        metrics_port, health_port = free_port(), free_port()
        settings = admin_settings(sim.agent_port) | self.o.settings
        env = operator_env(str(kubeconfig), sim.docker_host, metrics_port, settings)
        with (self.state / "operator.log").open("wb") as log:
            self.operator = subprocess.Popen(
                operator_command(f"http://127.0.0.1:{health_port}/healthz"),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self.operator.pid, f"http://127.0.0.1:{metrics_port}/metrics"

    def alive(self) -> bool:
        """True, or raise: a phase must not wait out its deadline on a dead operator."""
        assert self.operator is not None
        code = self.operator.poll()
        if code is not None:
            raise RuntimeError(
                f"the operator exited with {code} (negative: killed by that signal); "
                f"see {self.state / 'operator.log'} (kept with --keep)"
            )
        return True

    def measure(self, sim: Sim, kube: Kube, kubeconfig: Path) -> None:
        o = self.o
        wanted = set(names(o.deployments))
        sim.call("/sim/reset", method="POST")
        phases = PhaseWatch(kube.plane)
        pid, metrics_url = self.start_operator(sim, kubeconfig)
        start = time.monotonic()
        poll = 0.1 if o.deployments <= 200 else 0.5

        def owners() -> set[str]:
            return {s["Labels"].get(OWNER_NAME, "") for s in sim.services()}

        def all_running() -> bool:
            services = [s for s in sim.services() if s["Labels"].get(OWNER_NAME) in wanted]
            return self.alive() and wanted <= owners() and all(s["Running"] >= 1 for s in services)

        seconds = wait(lambda: self.alive() and wanted <= owners(), o.timeout, poll)
        if seconds is None:
            self.missed("converge", "all_services_s", o.timeout)
        else:
            self.note("converge", all_services_s=round(seconds, 2))
            rest = max(0.0, o.timeout - (time.monotonic() - start))
            running = wait(all_running, rest, poll)
            if running is None:
                self.missed("converge", "all_running_s", o.timeout)
            else:
                self.note("converge", all_running_s=round(time.monotonic() - start, 2))
        rest = max(0.0, o.timeout - (time.monotonic() - start))
        ready = wait(lambda: self.alive() and phases.all_ready(o.deployments), rest, 0.2)
        if ready is None:
            phases = kube.phases()
            self.missed("converge", "all_ready_s", o.timeout)
            self.note("converge", phases_at_deadline=_tally(phases.values()))
        else:
            self.note("converge", all_ready_s=round(time.monotonic() - start, 2))
        phases.close()
        self.note("converge", writes=sim.stats()["writes"])

        # The start's last status writes and its Events are part of converging, not of the
        # steady state: the window opens once they are sent.
        # (Every scrape costs the operator about 0.3 s of CPU at this size: every 5 s.)
        drained = wait(lambda: self.alive() and writes_pending(metrics_url) == 0, 120, 5.0)
        self.note(
            "converge",
            writes_drained_s=round(time.monotonic() - start, 2) if drained is not None else None,
        )
        self.alive()
        self.steady(sim, pid, metrics_url)
        self.note("steady", node_agents=agents_up(metrics_url))
        self.alive()  # figures of a window in which the operator died are no figures
        # A window that opens before convergence measures catching up, not a steady state.
        self.note("steady", after_all_ready=ready is not None)
        self.note(
            "memory",
            **{k.lower() + "_mib": round(v / 1024, 1) for k, v in memory_kib(pid).items()},
            deployments_known=o.deployments,
        )
        self.new_deployment(sim, kube)
        self.restore(sim)
        self.update(sim, kube)
        self.npu_unhealthy(sim)
        self.note("memory", vmhwm_end_mib=round(memory_kib(pid)["VmHWM"] / 1024, 1))

    def steady(self, sim: Sim, pid: int, metrics_url: str) -> None:
        # The bench's own scrapes stay outside the window; one of them is timed on its own
        # (a Prometheus scraping the operator pays it once per scrape interval).
        op0 = metric_sums(metrics_url)
        before, cpu0, t0 = sim.stats(), cpu_seconds(pid), time.monotonic()
        sim_cpu0 = cpu_seconds(sim.proc.pid)
        agents0 = (before.get("agents") or {}).get("cpu_seconds", 0.0)
        time.sleep(self.o.window)
        after, cpu1, t1 = sim.stats(), cpu_seconds(pid), time.monotonic()
        op1 = metric_sums(metrics_url)
        scrape_cpu_s = cpu_seconds(pid) - cpu1
        sim_cpu1 = cpu_seconds(sim.proc.pid)
        agents1 = (after.get("agents") or {}).get("cpu_seconds", 0.0)
        elapsed = t1 - t0
        per_minute = 60 / elapsed
        routes = {
            r: after["requests"].get(r, 0) - before["requests"].get(r, 0) for r in after["requests"]
        }
        reconciles = sum(
            v - op0.get(k, 0)
            for k, v in op1.items()
            if k.startswith("controller_runtime_reconcile_total")
        )
        lists = after["list_calls"] - before["list_calls"]
        self.note(
            "steady",
            window_s=round(elapsed, 1),
            operator_cpu_pct=round(100 * (cpu1 - cpu0) / elapsed, 1),
            # Of that, CPython's cyclic garbage collector (npuswarm_gc_seconds_total).
            gc_cpu_pct=round(
                100
                * sum(v - op0.get(k, 0) for k, v in op1.items() if k.startswith("npuswarm_gc"))
                / elapsed,
                1,
            ),
            metrics_scrape_cpu_s=round(scrape_cpu_s, 2),
            enginesim_cpu_pct=round(100 * (sim_cpu1 - sim_cpu0) / elapsed, 1),
            # Of that, the simulated node agents' handshakes and answers (thread CPU time).
            sim_agents_cpu_pct=round(100 * (agents1 - agents0) / elapsed, 1),
            manager_calls_per_min=round(sum(routes.values()) * per_minute, 1),
            list_calls_per_min=round(lists * per_minute, 1),
            writes_per_min=round((after["writes"] - before["writes"]) * per_minute, 1),
            service_writes_per_min=round(
                sum(routes.get(r, 0) for r in SERVICE_WRITES) * per_minute, 1
            ),
            agent_answers_per_min={
                k: round(v * per_minute, 1)
                for k, v in _delta(before.get("agents"), after.get("agents")).items()
                if v
            },
            operator_vmrss_mib=round(memory_kib(pid)["VmRSS"] / 1024, 1),
            reconciles_per_min=round(reconciles * per_minute, 1),
            list_calls_per_reconcile=round(lists / reconciles, 2) if reconciles else None,
            engine_mib_read_per_min=round(
                sum(after["bytes"].get(r, 0) - before["bytes"].get(r, 0) for r in after["bytes"])
                * per_minute
                / 2**20,
                1,
            ),
            requests_per_min={r: round(n * per_minute, 1) for r, n in sorted(routes.items()) if n},
        )

    def new_deployment(self, sim: Sim, kube: Kube) -> None:
        name = "md-new"
        started = time.monotonic()
        kube.apply([deployment(name)])
        applied = time.monotonic() - started
        seconds = wait(
            lambda: (
                self.alive() and any(s["Labels"].get(OWNER_NAME) == name for s in sim.services())
            ),
            self.o.phase_timeout,
            0.05,
        )
        if seconds is None:
            self.missed("new", "service_created_s", self.o.phase_timeout)
        else:
            # Timed from kubectl's return: the object exists from then on.
            self.note("new", service_created_s=round(seconds, 2), kubectl_apply_s=round(applied, 2))

    def restore(self, sim: Sim) -> None:
        victim = next(s for s in sim.services() if s["Labels"].get(OWNER_NAME) == "md-00000")
        sim.call(f"/sim/services/{victim['ID']}", method="DELETE")

        def back() -> bool:
            return self.alive() and any(
                s["Labels"].get(OWNER_NAME) == "md-00000" for s in sim.services()
            )

        seconds = wait(back, self.o.phase_timeout, 0.05)
        if seconds is None:
            self.missed("restore", "service_back_s", self.o.phase_timeout)
        else:
            self.note("restore", service_back_s=round(seconds, 2))

    def npu_unhealthy(self, sim: Sim) -> None:
        """An NPU that holds a replica turns Critical in its node's npu-smi: the time until the
        replica runs elsewhere. The operator sees it at its next read of that node's agent
        (every NPUSWARM_NPU_HEALTH_SECONDS), then waits its unhealthy grace before it moves
        the replica; the sim's agent reports the change at once (an agent's own interval
        would add up to one more read period)."""
        name = "md-00001"
        if name not in names(self.o.deployments):
            return
        off = [
            key
            for key in ("NPUSWARM_NODE_VALIDATION", "NPUSWARM_NPU_HEALTH")
            if self.o.settings.get(key, "true").lower() in ("false", "0", "no", "off")
        ]
        if off:
            self.note("npu", skipped=f"{'/'.join(off)} off: no NPU health is read")
            return
        grace = unhealthy_grace(self.o.settings)
        services = [s for s in sim.services() if s["Labels"].get(OWNER_NAME) == name]
        if len(services) != 1 or not services[0]["Node"] or not services[0]["Npus"].isdigit():
            self.note("npu", skipped=f"{name} is not one running replica on one NPU: {services}")
            return
        node, npu = services[0]["Node"], int(services[0]["Npus"])
        sim.set_npu_health(node, npu, "Critical")

        def moved() -> bool:
            self.alive()
            return any(
                s["Running"] >= 1 and (s["Node"], s["Npus"]) != (node, str(npu))
                for s in sim.services()
                if s["Labels"].get(OWNER_NAME) == name
            )

        deadline = grace + 30 + self.o.phase_timeout
        seconds = wait(moved, deadline, 0.2)
        sim.set_npu_health(node, npu, "OK")
        if seconds is None:
            self.missed("npu", "unhealthy_to_moved_s", deadline)
            self.note("npu", grace_s=grace)
            return
        self.note(
            "npu",
            unhealthy_to_moved_s=round(seconds, 1),
            grace_s=grace,
            beyond_grace_s=round(seconds - grace, 1),
        )

    def update(self, sim: Sim, kube: Kube) -> None:
        k = min(self.o.changed, self.o.deployments)
        changed = names(self.o.deployments)[-k:]
        before = sim.stats()
        kube.apply([deployment(n, image="sim/vllm:bench-2") for n in changed])

        def done() -> bool:
            self.alive()
            images = {s["Labels"].get(OWNER_NAME): s for s in sim.services()}
            return all(
                images.get(n, {}).get("Image") == "sim/vllm:bench-2" and images[n]["Running"] >= 1
                for n in changed
            )

        seconds = wait(done, self.o.phase_timeout, 0.1)
        if seconds is None:
            self.missed("update", "all_updated_s", self.o.phase_timeout)
            return
        # Writes that trail the last update (a retry, a status-driven pass) count too.
        time.sleep(3)
        after = sim.stats()
        writes = after["writes"] - before["writes"]
        self.note(
            "update",
            changed=k,
            all_updated_s=round(seconds, 2),
            writes=writes,
            writes_per_change=round(writes / k, 2),
            write_routes={
                r: after["requests"].get(r, 0) - before["requests"].get(r, 0)
                for r in after["requests"]
                if r.split()[0] in ("POST", "DELETE")
                and after["requests"].get(r, 0) != before["requests"].get(r, 0)
            },
        )


def _delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, int]:
    """The agents' answer counters over a window (/sim/stats "agents")."""
    old, new = (before or {}).get("counts", {}), (after or {}).get("counts", {})
    return {k: v - old.get(k, 0) for k, v in new.items()}


def _tally(values: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value or "(none)"] = counts.get(value or "(none)", 0) + 1
    return counts


# --- output ---------------------------------------------------------------------------------------


def _fmt(phase: dict[str, Any], key: str, unit: str = "") -> str:
    if key not in phase:
        return "-"
    value = phase[key]
    if value is None:
        return str(phase.get(f"{key}_note", "not reached"))
    return f"{value}{unit}"


def markdown(results: list[dict[str, Any]]) -> str:
    """One table row per run: the section 8 figures side by side."""
    header = (
        "| nodes x deployments | checkout | all services | all Ready | steady CPU | list calls/min "
        "| reconciles/min | writes/min | service writes/min | Engine calls/min | agents up "
        "| new -> service | removed -> back | k changed: writes | NPU unhealthy -> moved "
        "| RSS | sim CPU (agents) | node checks | run took |\n"
        "|" + " --- |" * 19 + "\n"
    )
    rows = []
    for r in sorted(
        results, key=lambda r: (r["params"]["nodes"], r["params"]["deployments"], r["started"])
    ):
        p = r["phases"]
        c, s, m = p.get("converge", {}), p.get("steady", {}), p.get("memory", {})
        n, u, rs = p.get("new", {}), p.get("update", {}), p.get("restore", {})
        update = (
            f"{u['changed']}: {u['writes']}"
            if u.get("writes") is not None
            else _fmt(u, "all_updated_s")
        )
        stopped = f" (stopped: {r['error']})" if r.get("error") else ""
        npu = p.get("npu", {})
        moved = _fmt(npu, "unhealthy_to_moved_s", " s")
        if npu.get("grace_s") is not None and npu.get("unhealthy_to_moved_s") is not None:
            moved += f" (grace {npu['grace_s']:g} + {npu['beyond_grace_s']} s)"
        agents = s.get("node_agents") or {}
        up = f"{agents['up']}/{agents['nodes']}" if agents else "-"
        sim_cpu = _fmt(s, "enginesim_cpu_pct", " %")
        if "sim_agents_cpu_pct" in s:
            sim_cpu += f" ({s['sim_agents_cpu_pct']} %)"
        settings = r["params"].get("settings") or {}
        checks = (
            "off"
            if str(settings.get("NPUSWARM_NODE_VALIDATION", "true")).lower() == "false"
            else "on"
            if "admin_settings" in r["params"]
            else "no agents (before)"
        )
        rows.append(
            f"| {r['params']['nodes']} x {r['params']['deployments']} | `{r['checkout']}` "
            f"| {_fmt(c, 'all_services_s', ' s')} | {_fmt(c, 'all_ready_s', ' s')} "
            f"| {_fmt(s, 'operator_cpu_pct', ' %')} | {_fmt(s, 'list_calls_per_min')} "
            f"| {_fmt(s, 'reconciles_per_min')} | {_fmt(s, 'writes_per_min')} "
            f"| {_fmt(s, 'service_writes_per_min')} | {_fmt(s, 'manager_calls_per_min')} | {up} "
            f"| {_fmt(n, 'service_created_s', ' s')} | {_fmt(rs, 'service_back_s', ' s')} "
            f"| {update} | {moved} | {_fmt(m, 'vmrss_mib', ' MiB')} | {sim_cpu} | {checks} "
            f"| {r.get('duration_s', '-')} s{stopped} |"
        )
    return header + "\n".join(rows) + "\n"


def replace_block(page: Path, name: str, body: str) -> None:
    """Rewrite what stands between ``<!-- name:begin -->`` and ``<!-- name:end -->``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = page.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{page} has no {begin} ... {end} block to fill")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    page.write_text(f"{head}{begin}\n{body}{end}{tail}")


TARGET_SIZE = (1000, 2000)


def _at(result: dict[str, Any], phase: str, key: str) -> Any:
    return result["phases"].get(phase, {}).get(key)


def _verdict(value: Any, good: bool, unit: str, result: dict[str, Any], note: str = "") -> str:
    """A figure against its goal. Below the target size only a miss is a verdict: these
    figures grow with the fleet, so a miss stays a miss, but a pass proves nothing yet."""
    size = (result["params"]["nodes"], result["params"]["deployments"])
    if value is None:
        return note or "not reached"
    if size == TARGET_SIZE:
        return f"{value}{unit}: {'met' if good else 'missed'}"
    if good:
        return f"{value}{unit} at {size[0]}x{size[1]} (target size not run)"
    return f"{value}{unit}: missed already at {size[0]}x{size[1]}"


def targets(results: list[dict[str, Any]]) -> str:
    """Where each target stands, per checkout, from its largest run (the sweep for list calls)."""
    by_checkout: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        by_checkout.setdefault(result["checkout"], []).append(result)
    checkouts = sorted(by_checkout, key=lambda c: min(r["started"] for r in by_checkout[c]))
    header = "| target | goal | " + " | ".join(f"`{c}`" for c in checkouts) + " |\n"
    header += "| --- | --- |" + " --- |" * len(checkouts) + "\n"
    rows: list[tuple[str, str, list[str]]] = []

    def row(
        target: str, goal: str, cell: Callable[[dict[str, Any], list[dict[str, Any]]], str]
    ) -> None:
        cells = []
        for c in checkouts:
            runs = sorted(by_checkout[c], key=lambda r: (r["params"]["deployments"], r["started"]))
            cells.append(cell(runs[-1], runs))
        rows.append((target, goal, cells))

    def converged(r: dict[str, Any], _: Any) -> str:
        value = _at(r, "converge", "all_running_s")
        text = _verdict(
            value,
            value is not None and value < 60,
            " s",
            r,
            # Services that never all appeared leave no running time, only that note.
            _at(r, "converge", "all_running_s_note")
            or _at(r, "converge", "all_services_s_note")
            or "",
        )
        ready = _at(r, "converge", "all_ready_s")
        return text + (f"; all Ready {ready} s" if ready is not None else "")

    def number(phase: str, key: str, limit: float, unit: str) -> Callable[..., str]:
        def cell(r: dict[str, Any], _: Any) -> str:
            value = _at(r, phase, key)
            return _verdict(
                value,
                value is not None and value < limit,
                unit,
                r,
                _at(r, phase, f"{key}_note") or "",
            )

        return cell

    def sweep(_: Any, runs: list[dict[str, Any]]) -> str:
        parts = []
        latest = {r["params"]["deployments"]: r for r in runs}  # runs are sorted by time
        for r in latest.values():
            per_reconcile = _at(r, "steady", "list_calls_per_reconcile")
            parts.append(
                f"M={r['params']['deployments']}: "
                f"{_at(r, 'steady', 'list_calls_per_min')}/min"
                + (f" ({per_reconcile}/reconcile)" if per_reconcile else "")
            )
        return "; ".join(parts)

    def writes(r: dict[str, Any], _: Any) -> str:
        value = _at(r, "steady", "writes_per_min")
        return _verdict(value, value == 0, "/min", r)

    def changed(r: dict[str, Any], _: Any) -> str:
        k, value = _at(r, "update", "changed"), _at(r, "update", "writes")
        if value is None:
            return _at(r, "update", "all_updated_s_note") or "-"
        return _verdict(f"{k} changed, {value} writes", value <= 1.5 * k, "", r)

    row("all deployments converged after an operator start", "< 60 s", converged)
    row(
        "steady-state operator CPU",
        "< 10 % of one core",
        number("steady", "operator_cpu_pct", 10, " %"),
    )
    row("new deployment -> service created", "< 2 s", number("new", "service_created_s", 2, " s"))
    row("hand-removed service -> back", "< 3 s", number("restore", "service_back_s", 3, " s"))
    row("Engine list calls vs deployments", "constant per pass", sweep)
    row("writes on a no-op pass", "0", writes)
    row("k changed replicas", "about k writes", changed)
    row(
        "operator RSS, all deployments known",
        "< 500 MiB",
        number("memory", "vmrss_mib", 500, " MiB"),
    )
    return header + "".join(f"| {t} | {g} | " + " | ".join(c) + " |\n" for t, g, c in rows)


PANELS = (
    ("steady", "operator_cpu_pct", "steady-state operator CPU, % of one core", 10.0),
    ("steady", "list_calls_per_min", "Engine list calls per minute", None),
)
COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e")


def plot(results: list[dict[str, Any]]) -> str:
    """An SVG, log-log: each panel one figure against the number of deployments, one line
    per checkout; a dashed line marks the goal where there is one."""
    width, height, margin = 420, 300, 55
    checkouts = sorted(
        {r["checkout"] for r in results},
        key=lambda c: min(r["started"] for r in results if r["checkout"] == c),
    )
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * width}" '
        f'height="{height + 30}" font-family="sans-serif" font-size="11">',
        f'<rect width="{2 * width}" height="{height + 30}" fill="white"/>',
    ]
    for panel, (phase, key, title, goal) in enumerate(PANELS):
        points = {
            c: sorted(
                (r["params"]["deployments"], _at(r, phase, key))
                for r in results
                if r["checkout"] == c and (_at(r, phase, key) or 0) > 0
            )
            for c in checkouts
        }
        values = [v for pts in points.values() for _, v in pts] + ([goal] if goal else [])
        xs = [x for pts in points.values() for x, _ in pts] + [1, 2000]
        if not values:
            continue
        x_hi = math.ceil(math.log10(max(xs)))  # decades from 1
        y_lo = math.floor(math.log10(min(values)))
        y_hi = max(y_lo + 1, math.ceil(math.log10(max(values))))
        left = panel * width + margin

        def at(
            x: float,
            y: float,
            left: int = left,
            y_lo: int = y_lo,
            y_hi: int = y_hi,
            x_hi: int = x_hi,
        ) -> tuple[float, float]:
            px = left + math.log10(x) / x_hi * (width - margin - 35)
            py = 25 + (1 - (math.log10(y) - y_lo) / (y_hi - y_lo)) * (height - 60)
            return px, py

        parts.append(f'<text x="{left}" y="15" font-weight="bold">{title}</text>')
        for decade in range(x_hi + 1):
            px, _ = at(10**decade, 10**y_lo)
            parts.append(
                f'<line x1="{px:.1f}" y1="25" x2="{px:.1f}" y2="{height - 35}" stroke="#ddd"/>'
            )
            parts.append(
                f'<text x="{px:.1f}" y="{height - 20}" text-anchor="middle">{10**decade:g}</text>'
            )
        for decade in range(y_lo, y_hi + 1):
            _, py = at(1, 10**decade)
            parts.append(
                f'<line x1="{left}" y1="{py:.1f}" x2="{left + width - margin - 35}" '
                f'y2="{py:.1f}" stroke="#ddd"/>'
            )
            parts.append(
                f'<text x="{left - 5}" y="{py + 4:.1f}" text-anchor="end">{10**decade:g}</text>'
            )
        parts.append(
            f'<text x="{left + (width - margin) / 2}" y="{height - 5}" '
            'text-anchor="middle">ModelDeployments</text>'
        )
        if goal:
            _, py = at(1, goal)
            parts.append(
                f'<line x1="{left}" y1="{py:.1f}" x2="{left + width - margin - 35}" '
                f'y2="{py:.1f}" stroke="#555" stroke-dasharray="4 3"/>'
            )
            parts.append(f'<text x="{left + 3}" y="{py - 3:.1f}" fill="#555">goal</text>')
        for n, checkout in enumerate(checkouts):
            color = COLORS[n % len(COLORS)]
            coords = [at(x, y) for x, y in points[checkout]]
            if len(coords) > 1:
                path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
                parts.append(f'<polyline points="{path}" fill="none" stroke="{color}"/>')
            parts += [
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>' for x, y in coords
            ]
            parts.append(
                f'<text x="{left + 10}" y="{40 + 14 * n}" fill="{color}">{checkout}</text>'
            )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def report(page: Path, results_dir: Path) -> None:
    """Rewrite the fleet blocks of ``page`` from every saved result."""
    results = [json.loads(p.read_text()) for p in sorted(results_dir.glob("fleet-*.json"))]
    if not results:
        raise SystemExit(f"no results in {results_dir}: run bench/fleet.py first")
    machines = sorted({json.dumps(r["machine"], sort_keys=True) for r in results})
    body = markdown(results) + "".join(f"\nMachine: `{m}`\n" for m in machines)
    replace_block(page, "fleet", body)
    replace_block(page, "targets", targets(results))
    (page.parent / "performance-fleet.svg").write_text(plot(results))
    print(f"[fleet] {page}: {len(results)} runs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--deployments", type=int, default=100)
    parser.add_argument("--window", type=float, default=60, help="steady-state seconds")
    parser.add_argument(
        "--timeout",
        type=float,
        default=300,
        help="deadline for convergence after the operator starts",
    )
    parser.add_argument(
        "--phase-timeout",
        type=float,
        default=90,
        help="deadline for each latency phase (new, restore, update)",
    )
    parser.add_argument("--changed", type=int, default=10, help="k deployments to change")
    parser.add_argument("--out", type=Path, default=None, help="JSON result file")
    parser.add_argument("--keep", action="store_true", help="keep logs in the state folder")
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NPUSWARM_X=VALUE",
        help="an operator setting other than its default (repeatable; reported in the result)",
    )
    parser.add_argument(
        "--report",
        type=Path,
        default=None,
        help="only rewrite this page's fleet tables from bench/results/",
    )
    args = parser.parse_args(argv)
    if args.report is not None:
        report(args.report, RESULTS)
        return 0
    if args.nodes * 8 < args.deployments + args.changed + 1:
        parser.error(f"{args.nodes} nodes x 8 NPUs cannot hold {args.deployments} deployments")
    # One file per run, named by size, checkout and time: "before" and "after" rows, and
    # repeated runs (the spread on a shared machine), stay side by side.
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M")
    out = args.out or RESULTS / f"fleet-{args.nodes}x{args.deployments}-{checkout()}-{stamp}.json"
    options = Options(
        args.nodes,
        args.deployments,
        args.window,
        args.timeout,
        args.phase_timeout,
        args.changed,
        out,
        args.keep,
        dict(item.split("=", 1) for item in args.setting),
    )
    with _state_dir(args.keep) as state:
        print(
            f"[fleet] {args.nodes} nodes, {args.deployments} deployments; state in {state}",
            flush=True,
        )
        result = Run(options, state).execute()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"[fleet] wrote {out} ({result['duration_s']} s)\n")
    print(markdown([result]))
    return 0


@contextlib.contextmanager
def _state_dir(keep: bool) -> Iterator[Path]:
    if keep:
        yield Path(tempfile.mkdtemp(prefix="npuswarm-fleet-"))
        return
    with tempfile.TemporaryDirectory(prefix="npuswarm-fleet-") as path:
        yield Path(path)


if __name__ == "__main__":
    sys.exit(main())
