"""NPU health from `npu-smi info`: parsing, which NPUs placement leaves alone and when, and a
pass that moves a replica off an unhealthy NPU after the grace (pure and in-memory Swarm)."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

from npuswarm.nodehealth import checks as node_checks, npusmi
from npuswarm.nodehealth.npusmi import NodeHealth, NpuReading, Process
from npuswarm.core.snapshot import snapshot_from_engine
from npuswarm.nodehealth.runner import NodeChecker
from npuswarm.reconcile import Reconciler
from npuswarm.core.pipeline import Desired
from npuswarm.settings import Settings

from .builders import NOW, deployment, node
from .memswarm import MemorySwarm
from .test_node_checks import ProbingSwarm

FAKE_NPU_SMI = Path(__file__).resolve().parents[2] / "hack" / "fake-npu-smi"

# npu-smi 23.0.6 on an Atlas 800I A2, two chips shown, one process.
REAL_TABLE = """\
+------------------------------------------------------------------------------------------------+
| npu-smi 23.0.6                   Version: 23.0.6                                               |
+---------------------------+---------------+----------------------------------------------------+
| NPU   Name                | Health        | Power(W)    Temp(C)           Hugepages-Usage(page)|
| Chip                      | Bus-Id        | AICore(%)   Memory-Usage(MB)  HBM-Usage(MB)        |
+===========================+===============+====================================================+
| 0     910B4               | OK            | 88.1        41                0    / 0             |
| 0                         | 0000:C1:00.0  | 0           0    / 0          29012/ 32768         |
+===========================+===============+====================================================+
| 1     910B4               | Alarm         | 87.9        43                0    / 0             |
| 0                         | 0000:C2:00.0  | 0           0    / 0          3366 / 32768         |
+===========================+===============+====================================================+
+---------------------------+---------------+----------------------------------------------------+
| NPU     Chip              | Process id    | Process name             | Process memory(MB)      |
+===========================+===============+====================================================+
| 0       0                 | 381727        | python3.11               | 25600                   |
+===========================+===============+====================================================+
| No running processes found in NPU 1                                                            |
+===========================+===============+====================================================+
"""


def test_parses_health_hbm_and_processes_of_each_chip() -> None:
    found = npusmi.parse_npu_smi(REAL_TABLE)
    assert found[0] == NpuReading(0, "OK", 29012, 32768, (Process(381727, "python3.11", 25600),))
    assert found[1] == NpuReading(1, "Alarm", 3366, 32768, ())
    assert found[0].healthy and not found[1].healthy
    assert npusmi.parse_npu_smi("npu-smi: command not found") == {}


def test_parses_what_the_labs_stand_in_prints(tmp_path: Path) -> None:
    state = {
        "npus": {
            "2": {
                "health": "Critical",
                "hbm_used_mb": 100,
                "processes": [{"pid": 7, "name": "vllm", "memory_mb": 90}],
            }
        }
    }
    (tmp_path / "s.json").write_text(json.dumps(state))
    out = subprocess.run(
        [str(FAKE_NPU_SMI), "info"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "NPU_SMI_STATE": str(tmp_path / "s.json")},
    ).stdout
    found = npusmi.parse_npu_smi(out)
    assert sorted(found) == list(range(8))
    assert found[2] == NpuReading(2, "Critical", 100, 32768, (Process(7, "vllm", 90),))
    assert all(found[n].healthy for n in found if n != 2)


def reading(node_id: str, at: Any = NOW, **npus: NpuReading) -> NodeHealth:
    return NodeHealth(node_id, f"host-{node_id}", at, {int(k[1:]): v for k, v in npus.items()})


def test_unhealthy_since_keeps_the_first_time_and_forgets_recovered_npus() -> None:
    first = npusmi.unhealthy_since({}, reading("a", n3=NpuReading(3, "Critical")))
    later = NOW + timedelta(seconds=30)
    again = npusmi.unhealthy_since(first, reading("a", later, n3=NpuReading(3, "Critical")))
    assert again == {("a", 3): NOW}
    assert npusmi.unhealthy_since(again, reading("a", later, n3=NpuReading(3, "OK"))) == {}
    failed_read = NodeHealth("a", "host-a", later, {}, error="no table")
    assert npusmi.unhealthy_since(again, failed_read) == again


def test_withheld_unhealthy_free_at_once_held_after_grace_and_foreign_processes() -> None:
    health = {
        "a": reading(
            "a",
            n0=NpuReading(0, "Critical"),
            n1=NpuReading(1, "Alarm"),
            n2=NpuReading(2, "OK", processes=(Process(9, "python3", 1),)),
            n3=NpuReading(3, "OK", processes=(Process(10, "vllm", 1),)),
        )
    }
    since = {("a", 0): NOW, ("a", 1): NOW}
    held = {"a": {1, 3}}  # replicas hold 1 (unhealthy) and 3 (their own process)
    early = npusmi.withheld_npus(health, since, held, NOW + timedelta(seconds=59), 60).all()
    assert set(early["a"]) == {0, 2}
    assert "is unhealthy (npu-smi: Critical)" in early["a"][0]
    assert "runs processes npuswarm did not start (pid 9 python3)" in early["a"][2]
    late = npusmi.withheld_npus(health, since, held, NOW + timedelta(seconds=60), 60).all()
    assert set(late["a"]) == {0, 1, 2}
    assert late["a"][1] == "NPU 1 on node host-a is unhealthy (npu-smi: Alarm, for 60s)"


def test_a_health_probe_is_read_only_and_never_a_claim() -> None:
    spec = npusmi.reading_spec(node("n1"), "img", "default", "x")
    assert spec["TaskTemplate"]["ContainerSpec"]["Command"] == ["npu-smi", "info"]
    assert "ReplicatedJob" in spec["Mode"]
    raw = {"ID": "h1", "Spec": spec}
    task = {
        "ID": "t",
        "ServiceID": "h1",
        "NodeID": "n1",
        "DesiredState": "running",
        "Status": {"State": "running"},
    }
    snapshot = snapshot_from_engine([], [raw], [task], [])
    assert snapshot.foreign == [] and snapshot.services == []
    assert spec["Name"] in snapshot.names()


class HealthSwarm(ProbingSwarm):
    """Validation probes pass; health probes print the table `tables` holds for their node."""

    def __init__(self, tables: dict[str, str], **kw: Any) -> None:
        super().__init__({}, **kw)
        self.tables = tables

    def service_tasks(self, service_id: str) -> list[dict[str, Any]]:
        labels = self.services[service_id]["Spec"]["Labels"]
        if npusmi.READING in labels:
            return [
                {
                    "ID": "t",
                    "CreatedAt": "x",
                    "Status": {"State": "complete", "ContainerStatus": {"ExitCode": 0}},
                }
            ]
        node_id = labels[node_checks.CHECK_NODE]
        npus = labels[node_checks.CHECK_NPUS]
        self.answers[node_id] = {
            "missing": [],
            "env": {"ASCEND_VISIBLE_DEVICES": npus, "ASCEND_DOCKER_RUNTIME": "True"},
        }
        return super().service_tasks(service_id)

    def service_logs(self, service_id: str) -> str:
        labels = self.services[service_id]["Spec"]["Labels"]
        if npusmi.READING in labels:
            return self.tables.get(labels[npusmi.READING_NODE], "")
        return super().service_logs(service_id)


def table(unhealthy: set[int]) -> str:
    rows = []
    for npu in range(8):
        health = "Critical" if npu in unhealthy else "OK"
        rows.append(
            f"| {npu:<5} 910B4               | {health:<13} | 86.5        40                0    / 0             |"
        )
        rows.append(
            "| 0                         | 0000:C1:00.0  | 0           0    / 0          0 / 32768            |"
        )
    return "\n".join(rows)


def test_a_replica_on_an_unhealthy_npu_moves_after_the_grace_and_the_npu_comes_back() -> None:
    clock = [NOW]
    settings = Settings(npu_unhealthy_grace_seconds=60, npu_health_seconds=10)
    swarm = HealthSwarm({}, nodes=2, npus=8)
    reconciler = Reconciler(swarm, settings, clock=lambda: clock[0])
    checker = NodeChecker(
        swarm, settings, reconciler.lock, lambda: reconciler.last_plan, clock=lambda: clock[0]
    )
    md = deployment("qwen3", replicas=1, npusPerReplica=4)
    desired = Desired(deployments=[md])
    wanted = [({}, md.spec.image)]

    def turn() -> set[str]:
        changed = checker.step(wanted)
        reconciler.run_pass(desired, checker.unusable)
        swarm.run_all()
        return changed

    for _ in range(4):  # validate both nodes, place the replica, read health once
        turn()
    replica = next(
        s["Spec"]["Labels"]
        for s in swarm.services.values()
        if "npuswarm.io/npus" in s["Spec"]["Labels"]
    )
    where, npus = replica["npuswarm.io/node"], replica["npuswarm.io/npus"]
    bad = int(npus.split(",")[0])
    swarm.tables[where] = table({bad})
    clock[0] += timedelta(seconds=11)
    turn()  # starts a health probe
    turn()  # reads it: unhealthy, but within the grace the replica stays
    assert (bad in checker.health[where].npus) and not checker.health[where].npus[bad].healthy
    still = next(
        s["Spec"]["Labels"]
        for s in swarm.services.values()
        if "npuswarm.io/npus" in s["Spec"]["Labels"]
    )
    assert (still["npuswarm.io/node"], still["npuswarm.io/npus"]) == (where, npus)

    clock[0] += timedelta(seconds=61)
    assert where in turn(), "the grace running out changes what is withheld"
    turn()
    moved = next(
        s["Spec"]["Labels"]
        for s in swarm.services.values()
        if "npuswarm.io/npus" in s["Spec"]["Labels"]
    )
    assert (moved["npuswarm.io/node"], moved["npuswarm.io/npus"]) != (where, npus)
    if moved["npuswarm.io/node"] == where:
        assert bad not in {int(n) for n in moved["npuswarm.io/npus"].split(",")}
    limits = checker.unusable(reconciler.last_plan.snapshot)
    assert bad in limits.npus[where]

    swarm.tables[where] = table(set())
    clock[0] += timedelta(seconds=11)
    turn()
    turn()
    assert not checker.unusable(reconciler.last_plan.snapshot).npus, "healthy again: usable"


def test_no_health_probe_on_a_node_that_failed_validation() -> None:
    swarm = ProbingSwarm({}, nodes=1, npus=8)
    reconciler = Reconciler(swarm, Settings(), clock=lambda: NOW)
    checker = NodeChecker(
        swarm, Settings(), reconciler.lock, lambda: reconciler.last_plan, clock=lambda: NOW
    )
    swarm.answers["node1"] = {"missing": ["/dev/davinci0"], "env": {}}
    md = deployment("qwen3")
    for _ in range(3):
        reconciler.run_pass(Desired(deployments=[md]), checker.unusable)
        checker.step([({}, md.spec.image)])
    assert not checker.verdicts()["node1"].ok
    assert checker.readings_running == {} and checker.health == {}
    assert not any(npusmi.READING in s["Spec"]["Labels"] for s in swarm.services.values())


def test_npu_gauges_count_unhealthy_and_busy_npus() -> None:
    from npuswarm.core.nodes import NodeLimits
    from npuswarm.core.status import npu_states

    swarm = MemorySwarm(nodes=1, npus=8)
    snapshot = swarm.observe()
    limits = NodeLimits(npus={"node1": {0: "sick"}}, busy={"node1": {1: "someone's python3"}})
    states = npu_states(snapshot, {}, [], limits)
    assert states[("host1", "unhealthy")] == 1
    assert states[("host1", "foreign")] == 1
    assert states[("host1", "free")] == 6
