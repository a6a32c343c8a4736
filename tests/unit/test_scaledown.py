"""Which replica a scale-down stops (core/scaledown.py), and that it leaves every gateway
before its service is removed (the pass's push-before-write rule, recorded in order)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from npuswarm.api import labels
from npuswarm.core.pipeline import Desired
from npuswarm.core.scaledown import kept_slots
from npuswarm.core.snapshot import ObservedService, ObservedTask
from npuswarm.gateway.push import Gateways
from npuswarm.reconcile import Reconciler
from npuswarm.settings import Settings

from .builders import NOW, deployment
from .test_gateway import CREDENTIALS, Recorder, gateway, model, overlay_swarm, run_with_addresses, settle


def slots(swarm: Any, name: str = "a") -> list[str]:
    return sorted(s["Spec"]["Labels"][labels.REPLICA] for s in swarm.services.values()
                  if s["Spec"]["Labels"].get(labels.OWNER_NAME) == name)


def task_of(swarm: Any, slot: str, name: str = "a") -> dict[str, Any]:
    (service,) = [s for s in swarm.services.values() if s["Spec"]["Labels"].get(labels.OWNER_NAME) == name
                  and s["Spec"]["Labels"][labels.REPLICA] == slot]
    (task,) = [t for t in swarm.tasks if t["ServiceID"] == service["ID"]]
    return task


class Setup:
    def __init__(self, replicas: int) -> None:
        self.swarm = overlay_swarm(nodes=2)
        self.swarm.nodes[0]["Status"]["Addr"] = "10.123.0.1"
        self.recorder = Recorder()
        removes = self.swarm.remove_service

        def recorded_remove(service_id: str) -> None:
            self.recorder.log.append(("remove", self.swarm.services[service_id]["Spec"]["Labels"][labels.REPLICA]))
            removes(service_id)

        self.swarm.remove_service = recorded_remove  # type: ignore[method-assign]
        self.gateways = Gateways("default", CREDENTIALS, send=self.recorder.send)
        self.reconciler = Reconciler(self.swarm, Settings(), clock=lambda: NOW, gateways=self.gateways)
        self.gw = gateway()
        self.run(replicas)
        run_with_addresses(self.swarm)
        (gw_service,) = [s for s in self.swarm.services.values() if labels.GATEWAY_NAME in s["Spec"]["Labels"]]
        self.swarm.tasks.append({
            "ID": "gw-task", "ServiceID": gw_service["ID"], "NodeID": "node1", "DesiredState": "running",
            "CreatedAt": "2026-11-30T11:00:00Z",
            "Status": {"State": "running", "Timestamp": "2026-11-30T11:00:00Z"},
            "Spec": {"ContainerSpec": {"Labels": {}}},
        })
        self.run(replicas)
        self.recorder.log.clear()
        self.recorder.states.clear()

    def run(self, replicas: int) -> Any:
        """Passes as the operator runs them: a write a gateway may still list waits for the
        pass after the gateway accepted a state without it."""
        desired = Desired(deployments=[model("a", replicas=replicas)], gateways=[self.gw])
        self.reconciler.run_pass(desired)
        settle(self.gateways)
        result = self.reconciler.run_pass(desired)
        settle(self.gateways)
        return result


def test_a_replica_not_ready_is_stopped_first_and_leaves_the_gateway_before_it_is_removed() -> None:
    s = Setup(replicas=3)
    assert slots(s.swarm) == ["0", "1", "2"]
    task_of(s.swarm, "0")["Status"]["State"] = "starting"  # still loading its model
    s.run(replicas=3)
    s.recorder.log.clear()
    s.run(replicas=2)
    assert slots(s.swarm) == ["1", "2"], "the replica that serves nobody yet goes, not the last slot"
    # No push was needed: a replica not ready was never a backend. Nothing else was touched.
    assert s.recorder.log == [("remove", "0")]


def test_the_newest_ready_replica_is_stopped_and_leaves_every_gateway_first() -> None:
    s = Setup(replicas=3)
    task_of(s.swarm, "0")["CreatedAt"] = "2026-11-30T12:00:00Z"  # restarted last: the newest
    s.run(replicas=3)
    s.recorder.log.clear()
    url = {slot: address(task_of(s.swarm, slot)) for slot in ("0", "1", "2")}
    s.run(replicas=2)
    assert slots(s.swarm) == ["1", "2"]
    assert s.recorder.log == [("push", {"served-a": 2}), ("remove", "0")]
    assert sorted(s.recorder.states[-1]["models"]["served-a"]) == sorted([url["1"], url["2"]])


def address(task: dict[str, Any]) -> str:
    return "http://" + task["NetworksAttachments"][0]["Addresses"][0].split("/")[0] + ":8000"


def test_all_alike_the_highest_slot_goes_and_a_later_scale_up_fills_the_lowest_free_slot() -> None:
    s = Setup(replicas=3)
    s.run(replicas=2)
    assert slots(s.swarm) == ["0", "1"]
    assert s.recorder.log == [("push", {"served-a": 2}), ("remove", "2")]

    s2 = Setup(replicas=3)
    task_of(s2.swarm, "1")["Status"]["State"] = "failed"
    s2.run(replicas=3)
    s2.run(replicas=2)
    assert slots(s2.swarm) == ["0", "2"]
    s2.run(replicas=3)
    assert slots(s2.swarm) == ["0", "1", "2"]


# --- the rule, over random replica sets ---------------------------------------------------------

START = datetime(2026, 11, 30, tzinfo=UTC)


def observed(slot: str, ready: bool, minute: int) -> ObservedService:
    task = ObservedTask(f"t{slot}", f"s{slot}", "node1", "running" if ready else "starting", "running",
                        None, START + timedelta(minutes=minute), START, None)
    return ObservedService(f"s{slot}", f"a-{slot}", 1, {labels.REPLICA: slot}, {}, [task])


replica_sets = st.dictionaries(st.integers(0, 12).map(str), st.tuples(st.booleans(), st.integers(0, 50)),
                               max_size=10)


@given(replica_sets, st.integers(0, 12))
def test_a_scale_down_keeps_the_ready_and_oldest_and_a_scale_up_keeps_every_replica(
    existing: dict[str, tuple[bool, int]], count: int
) -> None:
    by_slot = {slot: [observed(slot, ready, minute)] for slot, (ready, minute) in existing.items()}
    chosen = kept_slots(deployment("a", replicas=count), by_slot)
    kept = chosen if chosen is not None else [str(i) for i in range(count)]
    assert len(set(kept)) == len(kept) == count
    if count >= len(existing):
        assert set(existing) <= set(kept)  # nothing running is stopped
        return
    assert set(kept) <= set(existing)  # a scale-down starts nothing
    stopped = set(existing) - set(kept)
    for gone in stopped:
        for stays in kept:
            gone_ready, gone_minute = existing[gone]
            stays_ready, stays_minute = existing[stays]
            # Never a ready replica stopped while one not ready stays; among equals, never an
            # older one stopped while a newer one stays.
            assert not (gone_ready and not stays_ready)
            if gone_ready == stays_ready:
                assert gone_minute >= stays_minute
