"""NPU health from `npu-smi info`: parsing, and which NPUs placement leaves alone and when
(pure). A pass that moves a replica off an unhealthy NPU: tests/unit/test_node_agents.py."""

from __future__ import annotations

from dataclasses import replace

import json
import os
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

from npuswarm.nodehealth import npusmi
from npuswarm.nodehealth.npusmi import NodeHealth, NpuReading, Process

from .builders import NOW
from .memswarm import MemorySwarm

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


def test_a_column_printed_na_is_not_a_number() -> None:
    na = REAL_TABLE.replace("| 88.1        41 ", "| NA          NA ")
    found = npusmi.parse_npu_smi(na)
    assert (found[0].power_w, found[0].temperature_c, found[0].hbm_used_mb) == (None, None, 29012)


def test_parses_health_hbm_and_processes_of_each_chip() -> None:
    found = npusmi.parse_npu_smi(REAL_TABLE)
    assert found[0] == NpuReading(
        0,
        "OK",
        29012,
        32768,
        (Process(381727, "python3.11", 25600),),
        name="910B4",
        bus_id="0000:C1:00.0",
        power_w=88.1,
        temperature_c=41.0,
        aicore_percent=0.0,
    )
    assert (found[1].health, found[1].hbm_used_mb, found[1].processes) == ("Alarm", 3366, ())
    assert (found[1].bus_id, found[1].temperature_c) == ("0000:C2:00.0", 43.0)
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
    two = found[2]
    assert (two.health, two.hbm_used_mb, two.hbm_total_mb) == ("Critical", 100, 32768)
    assert two.processes == (Process(7, "vllm", 90),)
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


def test_the_grace_runs_from_when_the_agent_first_read_the_npu_unhealthy() -> None:
    """Issue 22, item 6: the operator reads each agent every 30 s, so counting from its own
    read moved a replica up to 30 s after grace; the agent's first unhealthy reading is the
    fault's time, kept within the operator's clock."""
    fault = NOW - timedelta(seconds=25)
    healthy = reading("a", NOW - timedelta(seconds=30), n3=NpuReading(3, "OK"))
    seen = replace(reading("a", NOW, n3=NpuReading(3, "Critical")), since={3: fault})
    assert npusmi.unhealthy_since({}, seen, healthy) == {("a", 3): fault}
    # A skewed agent clock: not before the last read that found it healthy, not after now.
    skewed = replace(seen, since={3: NOW - timedelta(hours=1)})
    assert npusmi.unhealthy_since({}, skewed, healthy) == {("a", 3): healthy.read_at}
    ahead = replace(seen, since={3: NOW + timedelta(minutes=5)})
    assert npusmi.unhealthy_since({}, ahead, healthy) == {("a", 3): NOW}
    # Without the agent's time (an older agent), the operator's read.
    assert npusmi.unhealthy_since({}, reading("a", NOW, n3=NpuReading(3, "Critical"))) == {
        ("a", 3): NOW
    }


def test_the_agent_keeps_the_first_unhealthy_reading_until_a_healthy_one() -> None:
    alarm = REAL_TABLE  # NPU 1 reads Alarm, NPU 0 OK
    first = npusmi.first_unhealthy({}, alarm, 100.0)
    assert first == {1: 100.0}
    assert npusmi.first_unhealthy(first, alarm, 130.0) == {1: 100.0}
    assert npusmi.first_unhealthy(first, alarm.replace("Alarm", "OK   "), 160.0) == {}


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
