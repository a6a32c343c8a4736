"""Fault grades (nodehealth/faults.py): npu-smi's error codes graded in MindCluster's levels,
and what the checker and the pass do with each grade: tolerate, restart in place once per
occurrence, keep new replicas off, isolate the NPU, isolate the node."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from pydantic import ValidationError

from npuswarm.api import labels
from npuswarm.core.pipeline import Desired
from npuswarm.nodehealth import agent, agents, faults
from npuswarm.nodehealth.faults import FaultTable
from npuswarm.reconcile import Reconciler
from npuswarm.settings import Settings

from .builders import NOW, deployment, node
from .memswarm import MemorySwarm
from .test_node_agents import EIGHT, ROOT, checker_for, exporter, npu_table, ok_answer

FAKE_NPU_SMI = Path(__file__).resolve().parents[2] / "hack" / "fake-npu-smi"
# What `npu-smi info -t health -i 0 -c 0` prints for a faulty chip (research: MindCluster's
# fault-diagnosis test data, tab-indented).
FAULTY = (
    "\tHealth Status                  : Alarm\n"
    "\tError Code                     : A4025021 8C03A000 8C084E00\n"
    "\tError Information              : ascend_monitor adda heart beat lost error\n"
)


def test_codes_are_read_as_npu_smi_prints_them() -> None:
    assert faults.error_codes(FAULTY) == ("A4025021", "8C03A000", "8C084E00")
    assert faults.error_codes("\tError Code                     : NA\n") == ()
    assert faults.error_codes("") == ()


def test_the_most_serious_level_wins_and_unknown_codes_isolate() -> None:
    table = FaultTable.default()
    # NotHandle + RestartNPU + FreeRestartNPU: handled as RestartNPU (isolate).
    fault = faults.grade("Alarm", faults.error_codes(FAULTY), table)
    assert fault is not None and (fault.level, fault.action) == ("RestartNPU", "isolate")
    assert faults.grade("Alarm", ["80C98008"], table).action == "restart"  # type: ignore[union-attr]
    assert faults.grade("Warning", ["A4025021"], table).action == "tolerate"  # type: ignore[union-attr]
    unknown = faults.grade("Critical", ["DEADBEEF"], table)
    assert unknown is not None and unknown.level == "SeparateNPU"
    minor = faults.grade("Warning", ["DEADBEEF"], table)  # a minor alarm: MindCluster's rule
    assert minor is not None and minor.level == "NotHandleFault"
    assert faults.grade("OK", ["80C98008"], table) is None
    assert faults.grade("Alarm", [], table) is None  # the Health column decides


def test_mindclusters_file_replaces_the_table_and_overrides_come_on_top(tmp_path: Path) -> None:
    path = tmp_path / "faultCode.json"
    path.write_text(json.dumps({"NotHandleFaultCodes": ["80C98008"],
                                "SeparateNPUCodes": ["80C98008", "11"],
                                "FaultTimeout": [{"x": 1}]}))
    table = faults.load_table(str(path), "11=SeparateNode, 0x80e18402=NotHandleFault")
    assert table.level("80C98008") == "SeparateNPU"  # listed twice: the more serious
    assert table.level("11") == "SeparateNode"
    assert table.level("80E18402") == "NotHandleFault"
    assert table.level("8C204E00") == "SeparateNPU"  # the defaults are replaced
    with pytest.raises(faults.FaultConfigError, match="want CODE=Level"):
        faults.load_table("", "80C98008=Reboot")


def test_a_bad_fault_setting_stops_the_start_with_its_reason() -> None:
    with pytest.raises(ValidationError, match="want CODE=Level"):
        Settings(fault_codes="80C98008")
    with pytest.raises(ValidationError, match="NPUSWARM_FAULT_CODES_FILE /nonexistent"):
        Settings(fault_codes_file="/nonexistent")


def test_the_lab_npu_smi_prints_codes_the_agent_reads_and_the_operator_grades(
    tmp_path: Path,
) -> None:
    state = tmp_path / "npu-smi-state.json"
    state.write_text(json.dumps({"npus": {"2": {"health": "Alarm",
                                                "error_codes": [0x80C98008]}}}))
    env = {"NPU_SMI_STATE": str(state), "PATH": "/usr/bin:/bin"}
    table = subprocess.run([str(FAKE_NPU_SMI), "info"], capture_output=True, text=True,
                           env=env, check=True).stdout
    import os

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        texts = agent.read_faults(table, str(FAKE_NPU_SMI))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert list(texts) == ["2"], "only the NPU whose health is not OK is asked"
    answer = {"npuSmi": {"text": table, "error": ""}, "npuFaults": texts}
    health = agents.health(node("n1"), answer, NOW)
    fault = health.npus[2].fault
    assert fault is not None and fault.codes == ("80C98008",) and fault.action == "restart"
    assert health.npus[2].healthy, "a restart-graded NPU keeps its replica (restarted in place)"


def graded(npu: int, health: str, codes: list[int]) -> dict[str, Any]:
    answer = ok_answer(table=npu_table(set()).replace(
        f"| {npu:<5} 910B4               | {'OK':<13}", f"| {npu:<5} 910B4               | {health:<13}"))
    code_text = " ".join(f"{c:08X}" for c in codes)
    answer["npuFaults"] = {str(npu): f"\tHealth Status : {health}\n\tError Code : {code_text}\n"}
    return answer


SETTINGS = Settings(agent_image="npuswarm:1", root_key=ROOT)


def force_updates(swarm: MemorySwarm) -> dict[str, int]:
    return {
        s["Spec"]["Name"]: int(s["Spec"]["TaskTemplate"].get("ForceUpdate") or 0)
        for s in swarm.services.values()
        if labels.NODE in s["Spec"]["Labels"]
    }


def read(checker: Any, reconciler: Reconciler) -> None:
    """The agents read now (a step reads only those due, by the monotonic clock)."""
    checker.read_now(reconciler.last_plan.snapshot.nodes)


def test_a_restart_graded_fault_restarts_its_replica_in_place_once_per_occurrence() -> None:
    swarm = MemorySwarm(nodes=1, npus=8)
    reconciler = Reconciler(swarm, SETTINGS, clock=lambda: NOW)
    checker, fake = checker_for(swarm, reconciler, SETTINGS)
    md = deployment("qwen3", replicas=1, npusPerReplica=8)
    desired = Desired(deployments=[md])
    fake.documents = {"node1": ok_answer(EIGHT)}
    reconciler.run_pass(desired, checker.unusable)
    read(checker, reconciler)
    reconciler.run_pass(desired, checker.unusable)
    (name,) = force_updates(swarm)
    before = dict(swarm.services)
    node_before = {k: v["Spec"]["TaskTemplate"]["ContainerSpec"]["Env"] for k, v in before.items()}

    fake.documents = {"node1": graded(0, "Alarm", [0x80C98008])}
    read(checker, reconciler)
    result = reconciler.run_pass(desired, checker.unusable)
    assert force_updates(swarm) == {name: 1}
    restart = [a for a in result.views[md.key].applied if a.reason.startswith("restarted in place")]
    assert restart and "80C98008" in restart[0].reason
    assert {k: v["Spec"]["TaskTemplate"]["ContainerSpec"]["Env"]
            for k, v in swarm.services.items()} == node_before, "same node, same NPUs"
    for _ in range(3):  # the fault persists: no loop
        read(checker, reconciler)
        reconciler.run_pass(desired, checker.unusable)
    assert force_updates(swarm) == {name: 1}

    fake.documents = {"node1": ok_answer(EIGHT)}  # it clears ...
    read(checker, reconciler)
    reconciler.run_pass(desired, checker.unusable)
    fake.documents = {"node1": graded(0, "Alarm", [0x80C98008])}  # ... and comes back
    read(checker, reconciler)
    reconciler.run_pass(desired, checker.unusable)
    assert force_updates(swarm) == {name: 2}


def test_isolate_preseparate_and_node_grades() -> None:
    swarm = MemorySwarm(nodes=2, npus=8)
    reconciler = Reconciler(swarm, SETTINGS, clock=lambda: NOW)
    checker, fake = checker_for(swarm, reconciler, SETTINGS)
    fake.documents = {
        "node1": graded(3, "Alarm", [0x8118043C]),  # PreSeparateNPU
        "node2": graded(5, "Critical", [0x80E18402]),  # SeparateNPU
    }
    reconciler.run_pass(Desired(), checker.unusable)
    checker.step()
    limits = checker.unusable(reconciler.last_plan.snapshot)  # type: ignore[union-attr]
    assert "takes no new replica" in limits.busy["node1"][3]
    assert "SeparateNPU: error code 80E18402" in limits.npus["node2"][5]
    assert not limits.nodes

    node_settings = Settings(agent_image="npuswarm:1", root_key=ROOT,
                             fault_codes="80E18402=SeparateNode")
    checker2, fake2 = checker_for(swarm, reconciler, node_settings)
    fake2.documents = dict(fake.documents)
    checker2.step()
    limits = checker2.unusable(reconciler.last_plan.snapshot)  # type: ignore[union-attr]
    assert "node host2 is isolated (NPU 5 SeparateNode: error code 80E18402)" in limits.nodes["node2"]


def test_error_codes_are_exported_as_npu_exporter_does() -> None:
    registry = exporter(graded(3, "Alarm", [0xA4025021, 0x8C03A000, 0x8C084E00]), "host1")
    text = generate_latest(registry).decode()
    labels_of = {"id": "3", "model_name": "910B4", "node": "host1",
                 "pcie_bus_info": "0000:C1:00.0"}
    value = registry.get_sample_value
    assert value("npu_chip_info_error_code", labels_of) == 0xA4025021
    assert value("npu_chip_info_error_code_1", labels_of) == 0x8C03A000
    assert value("npu_chip_info_error_code_2", labels_of) == 0x8C084E00
    assert "npu_chip_info_error_code_3{" not in text
    assert 'npu_chip_info_error_code{id="0"' not in text, "no series for an NPU without error"
