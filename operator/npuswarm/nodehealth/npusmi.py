"""NPU health from `npu-smi info`, read by the node agent on each node (nodehealth/agent.py).
Pure.

These functions parse the table it prints and decide which NPUs placement must leave
alone: an unhealthy NPU nobody holds at once, one a replica holds after a grace period
(moving a model costs minutes), and one running processes npuswarm did not start (someone's
`docker run`), like a foreign claim.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from npuswarm.api import labels
from npuswarm.nodehealth.faults import Fault

# The npu-smi reading services of earlier versions (value: the installation), removed at startup.
READING = labels.NPU_SMI_READING
# npu-smi's Health column: OK and Warning still serve; Alarm, Critical and anything unknown
# do not (MindCluster's device plugin draws the same line).
SERVING = frozenset({"OK", "Warning"})

# Row 1 of a chip: NPU id, name, health, then power (W) and temperature (C) where readable.
_CHIP_ROW = re.compile(r"^\|\s*(\d+)\s+(\S+)\s*\|\s*(\S+)\s*\|\s*(\S+)?\s*(\S+)?")
# Row 2: chip id, bus id, AI core use (%), DDR and HBM "used / total"; the last pair is HBM.
_HBM_ROW = re.compile(
    r"^\|\s*\d+\s*\|\s*([0-9A-Fa-f:.]+)\s*\|\s*(\S+).*\s(\d+)\s*/\s*(\d+)\s*\|\s*$"
)
_PROCESS_ROW = re.compile(r"^\|\s*(\d+)\s+\d+\s*\|\s*(\d+)\s*\|\s*(.*?)\s*\|\s*(\d+)\s*\|\s*$")


@dataclass(frozen=True)
class Process:
    pid: int
    name: str
    memory_mb: int


@dataclass(frozen=True)
class NpuReading:
    npu: int
    health: str
    hbm_used_mb: int = 0
    hbm_total_mb: int = 0
    processes: tuple[Process, ...] = ()
    # Read where the table has them (None: NA or absent), for the npu-exporter metrics.
    name: str = ""
    bus_id: str = ""
    power_w: float | None = None
    temperature_c: float | None = None
    aicore_percent: float | None = None
    # Its error codes graded (nodehealth/faults.py); None: OK, or no codes were read, and
    # the Health column decides.
    fault: Fault | None = None

    @property
    def healthy(self) -> bool:
        """It may keep its replica: no fault, a tolerated one, one its replica is restarted
        for, or one that only keeps new replicas off."""
        if self.fault is not None:
            return self.fault.action != "isolate"
        return self.health in SERVING

    @property
    def preseparated(self) -> bool:
        return self.fault is not None and self.fault.action == "preseparate"

    def why(self) -> str:
        return f"npu-smi: {self.health}" + (f", {self.fault.describe()}" if self.fault else "")


@dataclass(frozen=True)
class NodeHealth:
    node_id: str
    hostname: str
    read_at: datetime
    npus: Mapping[int, NpuReading]
    error: str = ""  # the reading could not run npu-smi: nothing is concluded from it
    # NPU -> when the agent first read it unhealthy (its own clock), when it says so.
    since: Mapping[int, datetime] = field(default_factory=dict)


def parse_npu_smi(text: str) -> dict[int, NpuReading]:
    """The chips of `npu-smi info` (npu-smi 23.x layout): health, HBM used/total, processes.
    Rows it does not know are skipped: an unreadable table gives no reading, never a verdict."""
    readings: dict[int, dict[str, Any]] = {}
    current: int | None = None
    in_processes = False
    for line in text.splitlines():
        if "Process id" in line:
            in_processes = True
            continue
        if in_processes:
            found = _PROCESS_ROW.match(line)
            if found and int(found.group(1)) in readings:
                process = Process(int(found.group(2)), found.group(3), int(found.group(4)))
                readings[int(found.group(1))]["processes"].append(process)
            continue
        hbm = _HBM_ROW.match(line)
        if hbm and current is not None:
            readings[current]["bus_id"] = hbm.group(1)
            readings[current]["aicore_percent"] = _number(hbm.group(2))
            readings[current]["hbm_used_mb"] = int(hbm.group(3))
            readings[current]["hbm_total_mb"] = int(hbm.group(4))
            current = None
            continue
        chip = _CHIP_ROW.match(line)
        if chip and not chip.group(2).startswith("0000:"):
            current = int(chip.group(1))
            readings[current] = {
                "health": chip.group(3),
                "processes": [],
                "name": chip.group(2),
                "power_w": _number(chip.group(4)),
                "temperature_c": _number(chip.group(5)),
            }
    return {
        npu: NpuReading(
            npu=npu,
            health=r["health"],
            hbm_used_mb=r.get("hbm_used_mb", 0),
            hbm_total_mb=r.get("hbm_total_mb", 0),
            processes=tuple(r["processes"]),
            name=r["name"],
            bus_id=r.get("bus_id", ""),
            power_w=r["power_w"],
            temperature_c=r["temperature_c"],
            aicore_percent=r.get("aicore_percent"),
        )
        for npu, r in readings.items()
    }


def _number(text: str | None) -> float | None:
    """A column's value; NA (a container or VM cannot read it) and the like are None."""
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def unhealthy_since(
    before: Mapping[tuple[str, int], datetime],
    health: NodeHealth,
    previous: NodeHealth | None = None,
) -> dict[tuple[str, int], datetime]:
    """(node, NPU) -> since when it is unhealthy, updated with one node's reading: when the
    agent first read it so (so the grace runs from the fault, not from the operator's next
    read of the agent), kept within the operator's own clock: not after this read, and not
    before the ``previous`` read that still found it healthy (an agent's skewed clock moves
    nothing early)."""
    since = {key: t for key, t in before.items() if key[0] != health.node_id}
    if health.error:
        since.update({k: t for k, t in before.items() if k[0] == health.node_id})
        return since
    for npu, reading in health.npus.items():
        if reading.healthy:
            continue
        key = (health.node_id, npu)
        if key in before:
            since[key] = before[key]
            continue
        started = min(health.since.get(npu, health.read_at), health.read_at)
        earlier = previous.npus.get(npu) if previous is not None and not previous.error else None
        if previous is not None and earlier is not None and earlier.healthy:
            started = max(started, previous.read_at)
        since[key] = started
    return since


def first_unhealthy(previous: Mapping[int, float], text: str, now: float) -> dict[int, float]:
    """The agent's side: NPU -> when (epoch seconds) it was first read unhealthy in an
    unbroken run of readings of ``npu-smi info`` (``text``); a healthy reading ends it."""
    return {
        npu: previous.get(npu, now)
        for npu, reading in parse_npu_smi(text).items()
        if not reading.healthy
    }


@dataclass(frozen=True)
class Withheld:
    """Node id -> NPU -> why placement leaves it: unhealthy ones, and ones busy with
    processes npuswarm did not start (counted as foreign)."""

    unhealthy: dict[str, dict[int, str]]
    busy: dict[str, dict[int, str]]

    def all(self) -> dict[str, dict[int, str]]:
        merged = {node: dict(npus) for node, npus in self.busy.items()}
        for node, npus in self.unhealthy.items():
            merged.setdefault(node, {}).update(npus)
        return merged


def withheld_npus(
    health: Mapping[str, NodeHealth],
    since: Mapping[tuple[str, int], datetime],
    held: Mapping[str, Iterable[int]],
    now: datetime,
    grace_seconds: float,
) -> Withheld:
    """What placement must leave alone: NPUs unhealthy and free at once, unhealthy under a
    replica after ``grace_seconds``, or running processes npuswarm did not start (on an NPU
    no replica of this installation holds)."""
    found: dict[str, dict[int, str]] = {}
    busy: dict[str, dict[int, str]] = {}
    for node_id, node_health in health.items():
        if node_health.error:
            continue
        ours = set(held.get(node_id, ()))
        host = node_health.hostname
        for npu, reading in sorted(node_health.npus.items()):
            if not reading.healthy:
                started = since.get((node_id, npu), node_health.read_at)
                lasted = (now - started).total_seconds()
                if npu not in ours or lasted >= grace_seconds:
                    found.setdefault(node_id, {})[npu] = (
                        f"NPU {npu} on node {host} is unhealthy ({reading.why()}"
                        + (f", for {lasted:.0f}s)" if npu in ours else ")")
                    )
            elif reading.preseparated and npu not in ours:
                busy.setdefault(node_id, {})[npu] = (
                    f"NPU {npu} on node {host} takes no new replica ({reading.why()})"
                )
            elif reading.processes and npu not in ours:
                shown = ", ".join(f"pid {p.pid} {p.name}" for p in reading.processes[:3])
                busy.setdefault(node_id, {})[npu] = (
                    f"NPU {npu} on node {host} runs processes npuswarm did not start ({shown})"
                )
    return Withheld(unhealthy=found, busy=busy)
