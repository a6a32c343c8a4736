"""NPU health on the multi-node lab: `npu-smi info` read by probe tasks on each node; an NPU
going unhealthy under a replica moves the replica after the grace and comes back when
healthy; NPUs busy with processes npuswarm did not start are kept out of placement."""

from __future__ import annotations

import io
import time
from contextlib import redirect_stdout

import pytest

import swarmlab
from npuswarm import cli, metrics
from npuswarm.nodehealth.runner import publish_verdicts
from npuswarm.settings import Settings
from tests.helpers import wait_for
from tests.invariants import npu_conflicts

from . import test_node_validation as validation
from .test_node_validation import Loops, model, probes_left

pytestmark = pytest.mark.lab

GRACE = 3.0


def replica_at(loops: Loops) -> tuple[str, frozenset[int]] | None:
    plan = loops.last.plan if loops.last else None
    for service in plan.snapshot.services_of(loops.md.key) if plan else []:
        allocation = service.allocation()
        if allocation is not None:
            return allocation.node_id, allocation.npus
    return None


def test_an_unhealthy_npu_moves_its_replica_and_comes_back_when_healthy(
    swarm_lab: swarmlab.Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(
        node_recheck_failed_seconds=1.0, npu_health_seconds=1.0, npu_unhealthy_grace_seconds=GRACE
    )
    monkeypatch.setattr(validation, "SETTINGS", settings)
    index_of = {swarm_lab.node_id(k): k for k in (1, 2, 3)}
    md = model("healthy", replicas=1)
    md = md.model_copy(update={"spec": md.spec.model_copy(update={"npusPerReplica": 4})})
    loops = Loops(swarm_lab, md)
    publish_verdicts(loops.checker)
    api = swarm_lab.client(1).api
    touched: list[int] = []
    try:

        def turn_checked() -> None:
            loops.turn()
            assert not npu_conflicts(api), npu_conflicts(api)

        def placed_and_read() -> tuple[str, frozenset[int]] | None:
            turn_checked()
            found = replica_at(loops)
            return found if found and found[0] in loops.checker.health else None

        node_id, npus = wait_for(placed_and_read, "a placed replica and a health reading", 90, 0.5)
        bad = min(npus)
        k = index_of[node_id]
        touched.append(k)
        swarm_lab.set_npu_state(k, {bad: {"health": "Critical", "hbm_used_mb": 31000}})
        broke = time.monotonic()

        def moved_off() -> bool:
            turn_checked()
            found = replica_at(loops)
            return found is not None and not (found[0] == node_id and bad in found[1])

        wait_for(moved_off, f"the replica to leave unhealthy NPU {bad}", 60, 0.5)
        moved_after = time.monotonic() - broke
        assert moved_after >= GRACE, "the replica waited for the grace"
        host = swarm_lab.node(k).hostname
        series = {"node": host, "npu": str(bad)}
        assert metrics.REGISTRY.get_sample_value("npuswarm_npu_healthy", series) == 0
        assert (
            metrics.REGISTRY.get_sample_value("npuswarm_npu_hbm_used_bytes", series)
            == 31000 * 2**20
        )
        withheld = loops.checker.unusable(loops.last.plan.snapshot).npus
        assert "is unhealthy (npu-smi: Critical" in withheld[node_id][bad]

        # `npuswarm nodes --validate` reads npu-smi too and shows it per NPU.
        out = io.StringIO()
        with pytest.MonkeyPatch.context() as patch, redirect_stdout(out):
            patch.setenv("DOCKER_HOST", swarm_lab.endpoint)
            code = cli.main(["nodes", "--validate", "--probe-image", swarmlab.IMAGE])
        assert code == 0, out.getvalue()
        assert (
            f"davinci{bad}" in out.getvalue() and "[Critical, HBM 31000/32768 MB]" in out.getvalue()
        )

        # Healthy again: the NPU is back in the pool (the replica stays where it went).
        swarm_lab.set_npu_state(k, {})
        healed = time.monotonic()

        def back() -> bool:
            turn_checked()
            return not loops.checker.unusable(loops.last.plan.snapshot).npus

        wait_for(back, f"NPU {bad} back in the pool", 60, 0.5)
        back_after = time.monotonic() - healed

        # A process npuswarm did not start on a free NPU: taken by someone else.
        free_node = next(n for n in index_of if n != replica_at(loops)[0])
        k2 = index_of[free_node]
        touched.append(k2)
        swarm_lab.set_npu_state(
            k2, {5: {"processes": [{"pid": 999, "name": "python3", "memory_mb": 9000}]}}
        )

        def taken() -> str | None:
            turn_checked()
            return loops.checker.unusable(loops.last.plan.snapshot).busy.get(free_node, {}).get(5)

        why = wait_for(taken, "NPU 5 with a foreign process withheld", 60, 0.5)
        assert "runs processes npuswarm did not start (pid 999 python3)" in why
        print(
            f"replica moved {moved_after:.1f}s after its NPU went unhealthy (grace {GRACE}s); "
            f"NPU back {back_after:.1f}s after healthy"
        )
    finally:
        for k in touched:
            swarm_lab.set_npu_state(k, {})
        loops.close()
        publish_verdicts(None)
    wait_for(lambda: not probes_left(swarm_lab), "no probe service left", timeout=30)


def test_a_replica_crashing_on_one_node_only_ends_up_running_on_another(
    swarm_lab: swarmlab.Lab,
) -> None:
    from npuswarm.core.relocation import FailureTracker
    from npuswarm.reconcile import Reconciler
    from npuswarm.core.pipeline import Desired
    from npuswarm.swarm import Swarm

    settings = Settings(failing_replica_threshold=2, failing_replica_backoff_seconds=5)
    reconciler = Reconciler(Swarm(base_url=swarm_lab.endpoint), settings)
    tracker = FailureTracker(settings.relocation_rules(), reconciler.clock)
    md = model("crashy", replicas=1)
    api = swarm_lab.client(1).api
    first = swarm_lab.node_id(1)
    # node1 sorts first, so the replica goes there; there its containers get no NPUs and the
    # fake vLLM exits at once, on every restart (validation is off in this test).
    swarm_lab.set_runtime_installed(1, False)
    previous: dict = {}
    try:
        started = time.monotonic()

        def running_elsewhere() -> str | None:
            nonlocal previous
            result = reconciler.run_pass(
                Desired(deployments=[md], previous={md.key: previous}), tracker.checks(None)
            )
            previous = result.views[md.key].status.model_dump(mode="json")
            assert not npu_conflicts(api), npu_conflicts(api)
            replica = result.views[md.key].status.replicaStatuses[0]
            if replica.nodeId and replica.nodeId != first and replica.taskState == "running":
                return replica.nodeId
            return None

        node = wait_for(running_elsewhere, "the crashing replica running on another node", 120, 0.5)
        took = time.monotonic() - started
        history = tracker.histories[(md.key, "0")]
        assert history.moves == 1 and first in history.avoid
        assert node != first
        print(f"crashing replica running on another node {took:.1f}s after it was created")
    finally:
        swarm_lab.set_runtime_installed(1, True)
        reconciler.finalize(md.metadata.namespace, md.metadata.name, md.metadata.uid)
        reconciler.close()
