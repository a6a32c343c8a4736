"""Node validation: what the node agent's container found means, and which nodes take no new
replica (pure). The agent and the pass together: tests/unit/test_node_agents.py."""

from __future__ import annotations

from typing import Any

from npuswarm.nodehealth import checks as node_checks
from npuswarm.nodehealth.checks import NodeVerdicts

from .builders import NOW, node

ALL_PATHS_OK: dict[str, Any] = {
    "missing": [],
    "env": {"ASCEND_VISIBLE_DEVICES": "0,1", "ASCEND_DOCKER_RUNTIME": "True"},
}


def verdict_for(
    line: dict[str, Any] | None, npus: frozenset[int] = frozenset({0, 1})
) -> node_checks.Verdict:
    return node_checks.judge(node("n1", hostname="atlas-7"), npus, line, NOW)


def test_a_probe_that_found_everything_passes() -> None:
    verdict = verdict_for(ALL_PATHS_OK)
    assert verdict.ok, verdict.summary()
    assert verdict.summary() == "node atlas-7 passed validation"


def test_no_devices_and_no_runtime_marker_says_the_runtime_is_not_the_default() -> None:
    line = {
        "missing": [
            "/dev/davinci0",
            "/dev/davinci1",
            *node_checks.CONTROL_DEVICES,
            *node_checks.DRIVER_FILES,
        ],
        "env": {"ASCEND_VISIBLE_DEVICES": "0,1"},
    }
    verdict = verdict_for(line)
    assert not verdict.ok
    assert [c.name for c in verdict.failures] == [node_checks.RUNTIME]
    message = verdict.summary()
    assert "Ascend Docker Runtime is not the default runtime on node atlas-7" in message
    assert "/dev/davinci0" in message and '"default-runtime": "ascend"' in message


def test_one_missing_npu_and_missing_driver_files_are_named() -> None:
    line = {
        "missing": ["/dev/davinci1", "/usr/local/bin/npu-smi"],
        "env": {"ASCEND_VISIBLE_DEVICES": "0,1", "ASCEND_DOCKER_RUNTIME": "True"},
    }
    verdict = verdict_for(line)
    failed = {c.name: c.message for c in verdict.failures}
    assert set(failed) == {node_checks.DEVICES, node_checks.DRIVER}
    assert (
        "/dev/davinci1" in failed[node_checks.DEVICES]
        and "/dev/davinci0" not in failed[node_checks.DEVICES]
    )
    assert "/usr/local/bin/npu-smi" in failed[node_checks.DRIVER]


def test_missing_control_devices_and_a_rewritten_env_fail_their_checks() -> None:
    line = {
        "missing": ["/dev/hisi_hdc"],
        "env": {"ASCEND_VISIBLE_DEVICES": "0-7", "ASCEND_DOCKER_RUNTIME": "True"},
    }
    failed = {c.name for c in verdict_for(line).failures}
    assert failed == {node_checks.CONTROL, node_checks.ENV}


def test_an_answer_without_a_validation_result_fails_the_agent_check() -> None:
    silent = verdict_for(None)
    assert [c.name for c in silent.failures] == [node_checks.AGENT]
    assert "answered without a validation result" in silent.summary()


def test_unusable_nodes_failed_or_never_validated_without_replicas() -> None:
    failed_node, fresh, busy, good = node("f"), node("n"), node("b"), node("g")
    failed = node_checks.judge(failed_node, frozenset({0}), {"missing": ["/dev/hisi_hdc"]}, NOW)
    ok_line = {
        "missing": [],
        "env": {"ASCEND_VISIBLE_DEVICES": "0", "ASCEND_DOCKER_RUNTIME": "True"},
    }
    known = NodeVerdicts(
        {"f": failed, "g": node_checks.judge(good, frozenset({0}), ok_line, NOW)},
        frozenset({"n"}),
    )
    found = node_checks.unusable_nodes([failed_node, fresh, busy, good], known, {"b", "f"})
    assert set(found) == {"f", "n"}
    assert "/dev/hisi_hdc" in found["f"]
    assert found["n"] == "node host-n is being validated (its node agent has not answered yet)"
