"""Node validation: which nodes need a probe, what a probe's answer means, which nodes take
no new replica, and a pass that honours it (pure, and against the in-memory Swarm)."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from npuswarm.nodehealth import checks as node_checks
from npuswarm.nodehealth.checks import NodeVerdicts, TaskResult
from npuswarm.nodehealth.runner import NodeChecker
from npuswarm.reconcile import Reconciler
from npuswarm.core.pipeline import Desired
from npuswarm.settings import Settings
from npuswarm.swarm import SwarmRejected

from .builders import NOW, deployment, node
from .memswarm import MemorySwarm

ALL_PATHS_OK: dict[str, Any] = {
    "missing": [],
    "env": {"ASCEND_VISIBLE_DEVICES": "0,1", "ASCEND_DOCKER_RUNTIME": "True"},
}


def result(line: dict[str, Any] | None, state: str = "complete", **kw: Any) -> TaskResult:
    return TaskResult(state=state, line=line, **kw)


def verdict_for(
    line: dict[str, Any] | None, npus: frozenset[int] = frozenset({0, 1}), **kw: Any
) -> node_checks.Verdict:
    return node_checks.judge(node("n1", hostname="atlas-7"), npus, result(line, **kw), NOW)


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


def test_a_probe_that_could_not_start_or_did_not_finish_fails_the_probe_check() -> None:
    rejected = verdict_for(None, state="rejected", error="No such image: vllm-ascend:v1")
    assert [c.name for c in rejected.failures] == [node_checks.CHECK_TASK]
    assert "No such image: vllm-ascend:v1" in rejected.summary()
    late = node_checks.judge(
        node("n1"), frozenset({0}), result(None, state="preparing"), NOW, timed_out=True
    )
    assert "did not finish in time (state preparing)" in late.summary()


def test_without_a_readable_log_the_exit_code_decides() -> None:
    assert verdict_for(None, exit_code=0).ok
    assert not verdict_for(None, state="failed", exit_code=node_checks.MISSING_EXIT).ok
    # python3 missing or broken is not a verdict on the devices: the probe itself failed.
    broken = verdict_for(None, state="failed", exit_code=127, error="task: non-zero exit (127)")
    assert [c.name for c in broken.failures] == [node_checks.CHECK_TASK]


def test_the_result_line_is_found_among_other_log_lines() -> None:
    text = (
        "noise\n" + node_checks.RESULT_MARK + json.dumps(ALL_PATHS_OK) + "\nNPUSWARM-PROBE {broken\n"
    )
    assert node_checks.result_line(text) == ALL_PATHS_OK
    assert node_checks.result_line("nothing here") is None


def test_the_probe_script_reports_missing_paths_and_the_env(
    tmp_path: Any, monkeypatch: Any, capsys: Any
) -> None:
    present = tmp_path / "davinci0"
    present.write_text("")
    monkeypatch.setenv("NPUSWARM_PROBE_PATHS", f"{present},{tmp_path / 'davinci1'}")
    monkeypatch.setenv("ASCEND_VISIBLE_DEVICES", "0,1")
    code = None
    try:
        exec(node_checks.SCRIPT, {})
    except SystemExit as ended:
        code = ended.code
    line = node_checks.result_line(capsys.readouterr().out)
    assert code == node_checks.MISSING_EXIT
    assert line is not None and line["missing"] == [str(tmp_path / "davinci1")]
    assert line["env"]["ASCEND_VISIBLE_DEVICES"] == "0,1"


def test_which_nodes_need_a_probe() -> None:
    n = node("n1")
    kwargs = {"check_seconds": 3600.0, "recheck_failed_seconds": 60.0}
    assert node_checks.check_reason(n, None, NOW, **kwargs) == "not validated yet"
    passed = node_checks.judge(
        n,
        frozenset({0}),
        result(
            {
                **ALL_PATHS_OK,
                "env": {"ASCEND_VISIBLE_DEVICES": "0", "ASCEND_DOCKER_RUNTIME": "True"},
            }
        ),
        NOW,
    )
    assert passed.ok
    assert node_checks.check_reason(n, passed, NOW + timedelta(seconds=3599), **kwargs) is None
    assert node_checks.check_reason(n, passed, NOW + timedelta(seconds=3600), **kwargs) is not None
    relabelled = n.model_copy(update={"labels": {"npuswarm.io/npu-model": "910B3"}})
    assert (
        node_checks.check_reason(relabelled, passed, NOW, **kwargs)
        == "engine, labels or NPUs changed"
    )
    upgraded = n.model_copy(update={"engine": "26.1.4"})
    assert (
        node_checks.check_reason(upgraded, passed, NOW, **kwargs) == "engine, labels or NPUs changed"
    )
    failed = node_checks.judge(n, frozenset({0}), result(None, state="rejected", error="x"), NOW)
    assert node_checks.check_reason(n, failed, NOW + timedelta(seconds=59), **kwargs) is None
    assert node_checks.check_reason(n, failed, NOW + timedelta(seconds=60), **kwargs) is not None
    for idle in (node("d", state="down"), node("p", availability="pause"), node("z", npus=0)):
        assert node_checks.check_reason(idle, None, NOW, **kwargs) is None


def test_unusable_nodes_failed_or_never_validated_without_replicas() -> None:
    failed_node, fresh, busy, good = node("f"), node("n"), node("b"), node("g")
    failed = node_checks.judge(
        failed_node, frozenset({0}), result(None, state="rejected", error="boom"), NOW
    )
    ok_line = {
        "missing": [],
        "env": {"ASCEND_VISIBLE_DEVICES": "0", "ASCEND_DOCKER_RUNTIME": "True"},
    }
    known = NodeVerdicts(
        {"f": failed, "g": node_checks.judge(good, frozenset({0}), result(ok_line), NOW)},
        frozenset({"n"}),
    )
    found = node_checks.unusable_nodes([failed_node, fresh, busy, good], known, {"b", "f"})
    assert set(found) == {"f", "n"}
    assert "boom" in found["f"]
    assert found["n"] == "node host-n is being validated (probe under way)"


def test_probe_spec_asks_for_npus_like_a_replica_and_is_a_one_shot_job() -> None:
    spec = node_checks.check_spec(
        node("abcdef1234567890"), frozenset({2, 3}), "img:1", "default", "n0nce"
    )
    template = spec["TaskTemplate"]
    env = dict(e.split("=", 1) for e in template["ContainerSpec"]["Env"])
    assert env["ASCEND_VISIBLE_DEVICES"] == "2,3" and env["ASCEND_RT_VISIBLE_DEVICES"] == "0,1"
    assert (
        "/dev/davinci2" in env["NPUSWARM_PROBE_PATHS"]
        and "/dev/davinci_manager" in env["NPUSWARM_PROBE_PATHS"]
    )
    assert template["Placement"]["Constraints"] == ["node.id==abcdef1234567890"]
    assert template["RestartPolicy"]["Condition"] == "none"
    assert "ReplicatedJob" in spec["Mode"]
    assert "npuswarm.io/managed-by" not in spec["Labels"]  # never read as a replica or orphan
    assert len(spec["Name"]) <= 63


def test_the_image_is_the_oldest_matching_deployments() -> None:
    n = node("n1", labels={"pool": "a"})
    wanted = [({"pool": "b"}, "other"), ({"pool": "a"}, "first"), ({}, "any")]
    assert node_checks.wanted_image(n, wanted) == "first"
    assert node_checks.wanted_image(n, [({"pool": "b"}, "x")]) == ""


# -- the pass honours the verdicts; the checker against an in-memory Swarm ----------------


class ProbingSwarm(MemorySwarm):
    """MemorySwarm whose probe jobs complete at once with what `answers` says per node."""

    def __init__(self, answers: dict[str, dict[str, Any] | None], **kw: Any) -> None:
        super().__init__(**kw)
        self.answers = answers
        self.probes_created = 0

    def create_service(self, spec: dict[str, Any]) -> str:
        if node_checks.CHECK in spec["Labels"]:
            self.probes_created += 1
        return super().create_service(spec)

    def service_tasks(self, service_id: str) -> list[dict[str, Any]]:
        spec = self.services[service_id]["Spec"]
        line = self.answers.get(spec["Labels"][node_checks.CHECK_NODE])
        return [
            {
                "ID": "t",
                "CreatedAt": "x",
                "Status": {
                    "State": "complete" if line else "preparing",
                    "ContainerStatus": {"ExitCode": 0},
                },
            }
        ]

    def service_logs(self, service_id: str) -> str:
        spec = self.services[service_id]["Spec"]
        line = self.answers.get(spec["Labels"][node_checks.CHECK_NODE])
        return node_checks.RESULT_MARK + json.dumps(line) if line else ""


def validator_for(swarm: ProbingSwarm, reconciler: Reconciler) -> NodeChecker:
    """Node validation as the runtime wires it: the pass's lock and its last plan."""
    return NodeChecker(
        swarm,
        Settings(npu_health=False),
        reconciler.lock,
        lambda: reconciler.last_plan,
        clock=lambda: NOW,
    )


def no_runtime(npus: str) -> dict[str, Any]:
    ids = [int(i) for i in npus.split(",")]
    return {
        "missing": [f"/dev/davinci{i}" for i in ids] + list(node_checks.CONTROL_DEVICES),
        "env": {"ASCEND_VISIBLE_DEVICES": npus},
    }


def test_a_node_that_fails_validation_gets_no_replica_and_the_status_says_why() -> None:
    swarm = ProbingSwarm({}, nodes=2, npus=8)
    reconciler = Reconciler(swarm, Settings(), clock=lambda: NOW)
    checker = validator_for(swarm, reconciler)
    md = deployment("qwen3", replicas=2, npusPerReplica=8)
    desired = Desired(deployments=[md])

    first = reconciler.run_pass(desired, checker.unusable)
    assert not swarm.by_name().get("default-qwen3-0"), "nothing goes to a node never validated"
    assert "is not validated yet" in first.views[md.key].status.replicaStatuses[0].message
    # Waiting for a first probe is progress, not a fault: no Degraded, no Warning.
    waiting = {c.type: c for c in first.views[md.key].status.conditions}
    assert waiting["Degraded"].status == "False"
    assert (waiting["Progressing"].status, waiting["Progressing"].reason) == (
        "True",
        "ValidatingNodes",
    )
    assert first.views[md.key].status.phase == "Pending"
    assert {(e.type, e.reason) for e in first.views[md.key].events} == {
        ("Normal", "NodeValidationPending")
    }

    # Probes start on both nodes' free NPUs (all 8) and hold them while they run.
    assert checker.step([({}, md.spec.image)]) == set()
    assert swarm.probes_created == 2 and set(checker.running) == {"node1", "node2"}
    held = reconciler.plan(desired, checker.unusable).placement.foreign
    assert set(held) == {"node1", "node2"}

    ok = {
        "missing": [],
        "env": {"ASCEND_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7", "ASCEND_DOCKER_RUNTIME": "True"},
    }
    swarm.answers.update({"node1": ok, "node2": no_runtime("0,1,2,3,4,5,6,7")})
    assert checker.step([({}, md.spec.image)]) == {"node1", "node2"}
    assert not any(node_checks.CHECK in s["Spec"]["Labels"] for s in swarm.services.values()), (
        "probes removed"
    )

    after = reconciler.run_pass(desired, checker.unusable)
    placed = {s["Spec"]["Labels"]["npuswarm.io/node"] for s in swarm.services.values()}
    assert placed == {"node1"}
    status = after.views[md.key].status
    degraded = next(c for c in status.conditions if c.type == "Degraded")
    assert degraded.reason == "NodeValidationFailed"
    assert "Ascend Docker Runtime is not the default runtime on node host2" in degraded.message
    events = [e for e in after.views[md.key].events if e.reason == "NodeValidationFailed"]
    assert events and "host2" in events[0].message
    assert {c.name: c.ok for c in checker.verdicts()["node2"].checks}[node_checks.RUNTIME] is False


def test_probes_never_take_npus_a_replica_holds_and_stale_probes_are_removed() -> None:
    swarm = ProbingSwarm({}, nodes=1, npus=8)
    stale = node_checks.check_spec(node("node1"), frozenset({0}), "img", "default", "old")
    swarm.create_service(stale)
    reconciler = Reconciler(swarm, Settings(), clock=lambda: NOW)
    md = deployment("qwen3", replicas=1, npusPerReplica=4)
    reconciler.run_pass(Desired(deployments=[md]))  # placed before validation existed
    checker = validator_for(swarm, reconciler)
    reconciler.run_pass(Desired(deployments=[md]), checker.unusable)
    checker.step([({}, md.spec.image)])
    probes = [s["Spec"] for s in swarm.services.values() if node_checks.CHECK in s["Spec"]["Labels"]]
    assert [p["Name"] for p in probes] != [stale["Name"]] and len(probes) == 1
    replica = next(
        s["Spec"]["Labels"]
        for s in swarm.services.values()
        if "npuswarm.io/npus" in s["Spec"]["Labels"]
    )
    replica_npus = {int(n) for n in replica["npuswarm.io/npus"].split(",")}
    check_npus = {int(n) for n in probes[0]["Labels"][node_checks.CHECK_NPUS].split(",")}
    assert check_npus and not check_npus & replica_npus


class NoJobsSwarm(ProbingSwarm):
    """A manager older than API 1.41: no replicated jobs."""

    def create_service(self, spec: dict[str, Any]) -> str:
        if "ReplicatedJob" in spec.get("Mode", {}):
            raise SwarmRejected("create_service: invalid mode: ReplicatedJob")
        return super().create_service(spec)


def test_a_manager_without_jobs_gets_a_replicated_probe_that_is_never_restarted() -> None:
    swarm = NoJobsSwarm({}, nodes=1, npus=8)
    reconciler = Reconciler(swarm, Settings(), clock=lambda: NOW)
    checker = validator_for(swarm, reconciler)
    reconciler.run_pass(Desired(deployments=[deployment("m")]), checker.unusable)
    checker.step([({}, "img")])
    (probe,) = [s["Spec"] for s in swarm.services.values()]
    assert probe["Mode"] == {"Replicated": {"Replicas": 1}}
    assert probe["TaskTemplate"]["RestartPolicy"]["Condition"] == "none"
