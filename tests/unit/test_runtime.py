"""The operator's running state without kopf: reading the index, loops that survive, gauges."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from npuswarm import metrics
from npuswarm.reconcile import Reconciler
from npuswarm.runtime import Leadership, Runtime
from npuswarm.core.pipeline import Desired
from npuswarm.runtime.index import IndexGate
from npuswarm.runtime.publisher import same_status
from npuswarm.runtime.swarm_watch import SwarmWatch, unseen_tasks
from npuswarm.runtime.triggers import Triggers, survive
from npuswarm.settings import Settings

from .builders import deployment
from .memswarm import MemorySwarm


def entry(name: str, generation: int = 1, deleting: bool = False, **spec: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": "team",
        "uid": f"uid-{name}",
        "generation": generation,
        "creationTimestamp": "2026-01-01T00:00:00Z",
    }
    if deleting:
        metadata["deletionTimestamp"] = "2026-12-01T00:00:00Z"
    body = {"image": "vllm-ascend:test", "model": f"/models/{name}", **spec}
    return {"metadata": metadata, "spec": body, "status": {"phase": "Ready"}}


def runtime(index: dict[Any, Any]) -> Runtime:
    settings = Settings()
    return Runtime(
        settings=settings,
        reconciler=Reconciler(MemorySwarm(), settings),
        kube=None,  # type: ignore[arg-type] - desired() never calls the API server
        leadership=Leadership(True, False, "default", 0, "me", frozenset({"team"})),
        index=index,
    )


def test_desired_sorts_the_index_into_valid_invalid_and_deleting_and_parses_once() -> None:
    index = {
        ("team", "ok"): [entry("ok")],
        ("team", "bad"): [entry("bad", generation=3, npusPerReplica=3)],
        ("team", "going"): [entry("going", deleting=True)],
        ("team", "sock"): [entry("sock", volumes=[{"hostPath": "/var/run/docker.sock", "mountPath": "/s"}])],
    }
    rt = runtime(index)

    def read() -> Any:
        return rt.reader.desired(rt.publisher.written, rt.publisher.gateways_written)

    desired = read()
    assert [md.key for md in desired.deployments] == ["team/ok"]
    generation, reason, message = desired.invalid["team/bad"]
    assert (generation, reason) == (3, "InvalidSpec") and "npusPerReplica" in message
    assert desired.deleting == {"team/going"}
    # Valid for the API server, refused by the operator's host policy: no placement, a reason.
    _, reason, message = desired.invalid["team/sock"]
    assert reason == "PolicyViolation" and "/var/run/docker.sock" in message
    assert desired.previous["team/ok"] == {"phase": "Ready"}
    assert desired.namespaces == {"team"}
    # The same generation is not parsed again; a new one is.
    assert read().deployments[0] is desired.deployments[0]
    index[("team", "ok")] = [entry("ok", generation=2, replicas=2)]
    assert read().deployments[0].spec.replicas == 2
    # What this operator wrote last counts before the index catches up with it.
    rt.publisher.written["team/ok"] = {"phase": "Progressing"}
    assert read().previous["team/ok"] == {"phase": "Progressing"}
    del index[("team", "bad")]
    read()
    assert "team/bad" not in rt.reader.parsed


def test_a_status_is_unchanged_when_every_patched_field_is_equal() -> None:
    before = {"phase": "Ready", "replicas": 1, "endpoint": "x:1"}
    assert same_status(before, {"phase": "Ready", "replicas": 1, "endpoint": "x:1"})
    assert same_status(before | {"old": 1}, {"phase": "Ready", "replicas": 1, "endpoint": "x:1"})
    assert not same_status(before, {"phase": "Ready", "replicas": 2, "endpoint": "x:1"})
    # A field the patch deletes (None) differs from one the server still has.
    assert not same_status(before, {"phase": "Ready", "replicas": 1, "endpoint": None})


def test_a_background_loop_survives_any_exception_and_counts_it() -> None:
    stop = threading.Event()
    calls = []

    def flaky() -> None:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("apiserver gone") if len(calls) == 1 else KeyError("surprise")
        stop.set()

    def errors() -> float:
        return metrics.REGISTRY.get_sample_value(
            "npuswarm_background_errors_total", {"loop": "leadership"}
        ) or 0.0

    before = errors()
    loop = threading.Thread(target=survive("leadership", flaky, stop))
    loop.start()
    loop.join(timeout=30)
    assert not loop.is_alive() and len(calls) == 3
    assert errors() - before == 2


def test_gauges_come_from_the_newest_pass_only() -> None:
    collector = metrics.PassCollector()
    registry = CollectorRegistry()
    registry.register(collector)

    def view(sequence: int, free: int) -> metrics.PassMetrics:
        replicas = metrics.DeploymentMetrics("Ready", 1, 1, 1, {}, 1.0)
        return metrics.PassMetrics(
            sequence=sequence,
            npus={("host1", "free"): free, ("host1", "foreign"): 4},
            deployments={"team/ok": replicas},
        )

    assert registry.get_sample_value("npuswarm_npus", {"node": "host1", "state": "free"}) is None
    collector.publish(view(2, 3))
    collector.publish(view(1, 8))  # an older pass finishing late changes nothing
    assert registry.get_sample_value("npuswarm_npus", {"node": "host1", "state": "free"}) == 3
    assert registry.get_sample_value("npuswarm_npus", {"node": "host1", "state": "foreign"}) == 4
    assert registry.get_sample_value("npuswarm_modeldeployments", {"phase": "Ready"}) == 1
    assert registry.get_sample_value("npuswarm_modeldeployments", {"phase": "Degraded"}) == 0
    assert registry.get_sample_value("npuswarm_replicas_ready", {"namespace": "team", "name": "ok"}) == 1


class Peerings:
    """kube.peering_status per scope: None is the cluster-wide object."""

    def __init__(self, statuses: dict[str | None, dict[str, Any] | None]) -> None:
        self.statuses = statuses
        self.asked: list[str | None] = []

    def peering_status(self, name: str, namespace: str | None) -> dict[str, Any] | None:
        self.asked.append(namespace)
        return self.statuses.get(namespace)


def test_leadership_reads_each_watched_namespaces_peering_and_yields_to_a_live_peer() -> None:
    from datetime import UTC, datetime

    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    peer = {"other": {"priority": 100, "lastseen": now, "lifetime": 60}}
    watch = runtime({}).leader
    watch.config = Leadership(False, False, "default", 100, "me", frozenset({"a", "b"}))
    watch.kube = Peerings({"a": {}, "b": {}})
    watch.read()
    assert watch.active and sorted(watch.kube.asked) == ["a", "b"]  # type: ignore[attr-defined]
    watch.kube = Peerings({"a": {}, "b": peer})
    watch.read()
    assert not watch.active  # a live peer of equal priority in one watched namespace
    # Cluster-wide: the cluster object; none at all means standalone unless peering is mandatory.
    watch.config = Leadership(False, False, "default", 100, "me", None)
    watch.kube = Peerings({})
    watch.read()
    assert watch.active and watch.kube.asked == [None]  # type: ignore[attr-defined]
    watch.config = Leadership(False, True, "default", 100, "me", None)
    watch.read()
    assert not watch.active


class Clocks:
    """A wall clock and a monotonic clock that move together, by hand."""

    def __init__(self) -> None:
        from datetime import UTC, datetime

        self.wall = datetime(2026, 12, 1, tzinfo=UTC)
        self.mono = 1000.0

    def advance(self, seconds: float) -> None:
        from datetime import timedelta

        self.wall += timedelta(seconds=seconds)
        self.mono += seconds

    def stamp(self, ago: float = 0.0) -> str:
        from datetime import timedelta

        return (self.wall - timedelta(seconds=ago)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class FlakyPeerings(Peerings):
    def __init__(self, statuses: dict[str | None, dict[str, Any] | None]) -> None:
        super().__init__(statuses)
        self.down = False

    def peering_status(self, name: str, namespace: str | None) -> dict[str, Any] | None:
        if self.down:
            raise OSError("connection refused")
        return super().peering_status(name, namespace)


def peered_watch(clocks: Clocks, identity: str, kube: Peerings) -> Any:
    from npuswarm.runtime.leadership import LeadershipWatch

    return LeadershipWatch(
        Leadership(False, False, "npuswarm", 20 if identity == "a" else 10, identity, None),
        kube,
        Settings(docker_timeout_seconds=30, peering_lifetime_seconds=60),
        Triggers(),
        clock=lambda: clocks.wall,
        monotonic=lambda: clocks.mono,
    )


def test_a_leader_cut_off_from_the_api_server_stops_writing_before_a_standby_may_start() -> None:
    """Issue 25, item 1: a failed read kept the last verdict (leader) forever, so after the
    peering lifetime a standby led too and both wrote to Swarm."""
    clocks = Clocks()
    kube = FlakyPeerings({None: {"a": {"priority": 20, "lastseen": clocks.stamp(), "lifetime": 60}}})
    watch = peered_watch(clocks, "a", kube)
    watch.read()
    assert watch.leader
    kube.down = True  # the API server is unreachable from this instance, Swarm is not
    clocks.advance(55.9)  # lastseen + lifetime - margin (4 s) is 56 s away
    assert watch.leader
    clocks.advance(0.2)
    assert not watch.leader
    # The standby's view: a's record is live until lastseen + 60, by its own clock.
    standby = peered_watch(clocks, "b", FlakyPeerings(
        {None: {"a": {"priority": 20, "lastseen": clocks.stamp(56.1), "lifetime": 60},
                "b": {"priority": 10, "lastseen": clocks.stamp(), "lifetime": 60}}}))
    standby.read()
    assert not standby.leader  # a still counts as live for 3.9 s more


def test_a_new_leader_waits_out_the_old_ones_last_possible_write() -> None:
    """The old leader stops at its record's expiry - 4 s at the latest, with one Docker call
    of up to 30 s under way, on a clock up to 4 s off: 30 + 4 s after the expiry."""
    clocks = Clocks()
    a_live = {"priority": 20, "lastseen": clocks.stamp(50), "lifetime": 60}
    b_live = {"priority": 10, "lastseen": clocks.stamp(), "lifetime": 60}
    kube = Peerings({None: {"a": a_live, "b": b_live}})
    standby = peered_watch(clocks, "b", kube)
    standby.read()
    assert not standby.active  # a leads
    clocks.advance(11)  # a's record expired 1 s ago, and kopf already removed it
    kube.statuses = {None: {"b": {**b_live, "lastseen": clocks.stamp()}}}
    standby.read()
    assert standby.active and not standby.leader  # a may still be writing
    clocks.advance(30 + 4 - 1 - 0.1)
    standby.read()
    assert not standby.leader
    clocks.advance(0.2)
    assert standby.leader
    # Long after any other record expired, leading needs no wait.
    fresh = peered_watch(clocks, "b", Peerings({None: {
        "a": {"priority": 20, "lastseen": clocks.stamp(600), "lifetime": 60},
        "b": {"priority": 10, "lastseen": clocks.stamp(), "lifetime": 60}}}))
    fresh.read()
    assert fresh.leader


def test_a_swarm_write_is_not_sent_without_the_lease() -> None:
    from npuswarm.swarm import LeaseLapsed, Swarm

    # Nothing listens there: a write that got past the fence would fail as unavailable.
    swarm = Swarm(base_url="unix:///nonexistent/docker.sock", timeout=1)
    swarm.fence = lambda: False
    before = metrics.REGISTRY.get_sample_value(
        "npuswarm_swarm_api_calls_total", {"operation": "remove_service", "outcome": "fenced"}
    ) or 0
    with pytest.raises(LeaseLapsed):
        swarm.remove_service("some-service")
    after = metrics.REGISTRY.get_sample_value(
        "npuswarm_swarm_api_calls_total", {"operation": "remove_service", "outcome": "fenced"}
    )
    assert after == before + 1


class Throttled:
    """An API server that answers 429 to the first status write of each deployment."""

    def __init__(self) -> None:
        self.refused: set[str] = set()
        self.written: list[str] = []

    def patch_status(self, namespace: str, name: str, patch: dict[str, Any], plural: str = "") -> bool:
        if name not in self.refused:
            self.refused.add(name)
            raise RuntimeError("(429)\nReason: Too Many Requests")
        self.written.append(name)
        return True


def test_a_refused_status_write_is_retried_in_the_background(monkeypatch: Any) -> None:
    import asyncio

    from npuswarm.api.deployment import ModelDeploymentStatus
    from npuswarm.core.pipeline import Desired
    from npuswarm.runtime import publisher as publisher_module

    monkeypatch.setattr(publisher_module, "STATUS_RETRY_SECONDS", 0.01)
    rt = runtime({})
    throttled = rt.publisher.kube = Throttled()
    status = ModelDeploymentStatus(phase="Progressing", replicas=1)

    async def scenario() -> list[str]:
        await rt.publisher.write_statuses({"team/a": status}, Desired(), resync=False)
        assert throttled.written == [], "the pass does not wait for the API server"
        deadline = asyncio.get_running_loop().time() + 10
        while not throttled.written and asyncio.get_running_loop().time() < deadline:
            await rt.publisher.settled()
            await asyncio.sleep(0.01)
        await rt.publisher.close()
        return throttled.written

    failed = {"operation": "status"}
    before = metrics.REGISTRY.get_sample_value("npuswarm_kube_api_errors_total", failed) or 0
    assert asyncio.run(scenario()) == ["a"], "written once the API server accepts"
    assert metrics.REGISTRY.get_sample_value("npuswarm_kube_api_errors_total", failed) == before + 1
    assert metrics.REGISTRY.get_sample_value("npuswarm_status_writes_pending") == 0


def test_a_deleted_deployments_refused_status_is_dropped_with_its_backoff(monkeypatch: Any) -> None:
    """Refused, then the object deleted before the retry: nothing of it is written or kept
    (a new object of that name starts without the old one's backoff)."""
    import asyncio

    from npuswarm.api.deployment import ModelDeploymentStatus
    from npuswarm.core.pipeline import Desired
    from npuswarm.runtime import publisher as publisher_module

    monkeypatch.setattr(publisher_module, "STATUS_RETRY_SECONDS", 0.05)
    rt = runtime({})
    throttled = rt.publisher.kube = Throttled()
    status = ModelDeploymentStatus(phase="Progressing", replicas=1)

    async def scenario() -> None:
        await rt.publisher.write_statuses({"team/a": status}, Desired(), resync=False)
        deadline = asyncio.get_running_loop().time() + 10
        while not throttled.refused and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        rt.publisher.forget("team/a")
        await rt.publisher.settled()
        await rt.publisher.close()

    asyncio.run(scenario())
    assert throttled.refused == {"a"} and throttled.written == []
    assert not rt.publisher._retries


class Recording:
    """An API server that records what it was sent, in order."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def patch_status(self, namespace: str, name: str, patch: dict[str, Any], plural: str = "") -> bool:
        self.calls.append(f"status {name}")
        return True

    def post_event(self, reference: dict[str, str], type_: str, reason: str, message: str) -> None:
        self.calls.append(f"event {reference['name']}")


def test_statuses_are_written_before_events_queued_ahead_of_them(monkeypatch: Any) -> None:
    """At a fleet's start each deployment's first Events went into the same queue as its
    statuses and held its Ready back; now every status waiting is sent before any Event."""
    import asyncio

    from npuswarm.api.deployment import ModelDeploymentStatus
    from npuswarm.core.kube_events import Event
    from npuswarm.core.pipeline import DeploymentView, Desired
    from npuswarm.runtime import publisher as publisher_module

    monkeypatch.setattr(publisher_module, "STATUS_WRITERS", 1)  # one writer: a strict order
    rt = runtime({})
    recording = rt.publisher.kube = Recording()
    status = ModelDeploymentStatus(phase="Ready", replicas=1)
    names = [f"m{i}" for i in range(5)]
    views = {
        f"team/{n}": DeploymentView(f"team/{n}", status, [Event("Normal", "Placed", n)])
        for n in names
    }

    async def scenario() -> None:
        await rt.publisher.post_events(views, {})
        await rt.publisher.write_statuses({f"team/{n}": status for n in names}, Desired(), False)
        await rt.publisher.settled()
        await rt.publisher.close()

    asyncio.run(scenario())
    assert recording.calls == [f"status {n}" for n in names] + [f"event {n}" for n in names]
    assert metrics.REGISTRY.get_sample_value("npuswarm_events_pending") == 0


class Ordered:
    """An API server whose first PATCH of an object answers only when released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.first_sent = threading.Event()
        self.written: list[tuple[str, str]] = []

    def patch_status(self, namespace: str, name: str, patch: dict[str, Any], plural: str = "") -> bool:
        if not self.written:
            self.first_sent.set()
            self.release.wait(10)
        self.written.append((name, patch["phase"]))
        return True


def test_a_newer_status_replaces_one_not_yet_written_and_never_lands_before_it() -> None:
    """Three passes change a status while the first PATCH hangs: the first lands, then only
    the newest (never the middle one, never the first after the newest)."""
    import asyncio

    from npuswarm.api.deployment import ModelDeploymentStatus
    from npuswarm.core.pipeline import Desired

    rt = runtime({})
    slow = rt.publisher.kube = Ordered()

    async def scenario() -> list[tuple[str, str]]:
        for phase in ("Pending", "Progressing", "Ready"):
            status = ModelDeploymentStatus(phase=phase, replicas=1)
            await rt.publisher.write_statuses({"team/a": status}, Desired(), resync=False)
            if phase == "Pending":  # a writer has the first one and hangs on it
                assert await asyncio.to_thread(slow.first_sent.wait, 10)
        slow.release.set()
        await rt.publisher.settled()
        await rt.publisher.close()
        return slow.written

    assert asyncio.run(scenario()) == [("a", "Pending"), ("a", "Ready")]


class ListFails:
    """The API server is down: the complete read that would confirm an orphan fails."""

    def existing(self, owners: set[str], plural: str = "modeldeployments") -> None:
        return None


def test_an_orphan_the_api_server_cannot_confirm_is_kept_and_asked_about_again_soon(
    monkeypatch: Any,
) -> None:
    import asyncio

    from npuswarm.api.deployment import ModelDeployment
    from npuswarm.core.pipeline import Desired
    from npuswarm.runtime import passes as passes_module

    monkeypatch.setattr(passes_module, "ORPHAN_RETRY_SECONDS", 0.01)
    rt = runtime({})
    swarm = MemorySwarm()
    gone = ModelDeployment.model_validate(entry("gone"))
    Reconciler(swarm, rt.settings).run_pass(Desired(deployments=[gone]))
    rt.passes.reconciler = Reconciler(swarm, rt.settings, owners=ListFails())  # type: ignore[arg-type]

    async def scenario() -> bool:
        loop = rt.triggers.loop = asyncio.get_running_loop()
        await rt.passes.one_pass(set(), everything=True)
        wake = rt.triggers.wake
        wake.clear()
        deadline = loop.time() + 10
        while not wake.is_set() and loop.time() < deadline:
            await asyncio.sleep(0.01)
        return wake.is_set()

    assert asyncio.run(scenario()), "no pass asked for after an unconfirmed orphan"
    assert list(swarm.by_name()) == ["team-gone-0"]  # kept meanwhile


def test_a_poll_that_finds_the_task_states_the_last_pass_saw_asks_for_no_pass() -> None:
    """The pass hands the poll the task states it saw (issue 25, item 6: they were never
    written, so every poll after a pass asked for a pass the last one had already done), and
    forgets its writes once their echoes are over."""
    swarm, settings = MemorySwarm(), Settings()
    reconciler = Reconciler(swarm, settings)
    md = deployment("m")
    reconciler.run_pass(Desired(deployments=[md]))
    swarm.run_all()
    result = reconciler.run_pass(Desired(deployments=[md]))
    triggers = Triggers()
    watch = SwarmWatch(swarm, settings, triggers, None)  # type: ignore[arg-type] - not polled
    watch.recent_writes = {"long-gone": time.monotonic() - 60}
    watch.saw_pass(result)
    assert "long-gone" not in watch.recent_writes
    # What Swarm.task_states answers the poll: tasks Swarm wants running, of our services.
    own = {t["ID"]: t["Status"]["State"] for t in swarm.tasks
           if t["DesiredState"] == "running" and t["ServiceID"] in watch.owner_of_service}
    assert own and set(own.values()) == {"running"}
    assert unseen_tasks(own, watch.tasks_seen, {}) == []
    failed = dict.fromkeys(own, "failed")
    assert unseen_tasks(failed, watch.tasks_seen, {}) == sorted(own)
    # Seen by the previous poll already: asked once, not again.
    assert unseen_tasks(failed, watch.tasks_seen, failed) == []


class Listing:
    """The API server's complete LISTs (kube.Kube.listed), one answer per call."""

    def __init__(self, *answers: dict[str, set[str]] | None) -> None:
        self.answers = list(answers)
        self.asked: list[str] = []

    def __call__(self, plural: str) -> set[str] | None:
        self.asked.append(plural)
        answer = self.answers[0] if len(self.answers) == 1 else self.answers.pop(0)
        return None if answer is None else answer.get(plural, set())


def test_the_indexes_are_complete_once_they_hold_every_listed_object() -> None:
    """Issue 25, item 3: kopf says nothing when its indexes are filled; a pass on half an
    index pushes gateways half the models and takes the rest's services for orphans."""
    index: dict[Any, Any] = {("team", "a"): [entry("a")]}
    reader = runtime(index).reader
    listed = {"modeldeployments": {"team/a", "team/b"}, "modelgateways": set()}
    gate = IndexGate(Listing(None, listed, listed))
    assert not gate.check(reader, gate.list_all())  # the LIST failed: not known
    assert not gate.check(reader, gate.list_all())  # team/b is not indexed yet
    index[("team", "b")] = [entry("b")]
    assert gate.check(reader, gate.list_all()) and gate.complete
    # b deleted between kopf's LIST and ours: the next LIST no longer names it.
    late = IndexGate(Listing({"modeldeployments": {"team/a", "team/gone"}},
                             {"modeldeployments": {"team/a"}}))
    assert not late.check(reader, late.list_all()) and late.check(reader, late.list_all())


def test_no_pass_runs_until_the_indexes_are_complete(monkeypatch: Any) -> None:
    import asyncio

    from npuswarm.runtime import passes as passes_module

    index: dict[Any, Any] = {}
    rt = runtime(index)
    swarm = rt.reconciler.swarm
    assert isinstance(swarm, MemorySwarm)
    listing = Listing({"modeldeployments": {"team/a"}})
    rt.passes.gate = IndexGate(listing)
    monkeypatch.setattr(passes_module, "INDEX_RETRY_SECONDS", 0.01)

    async def scenario() -> tuple[int, int]:
        loop = rt.triggers.loop = asyncio.get_running_loop()
        assert rt.leader.leader  # standalone
        task = asyncio.create_task(rt.passes.run())
        rt.triggers.request(everything=True)
        deadline = loop.time() + 10
        while len(listing.asked) < 3 and loop.time() < deadline:
            await asyncio.sleep(0.01)
        reads_before = swarm.calls["list_services"]
        index[("team", "a")] = [entry("a")]
        while not swarm.by_name() and loop.time() < deadline:
            await asyncio.sleep(0.01)
        rt.triggers.stop.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return reads_before, len(swarm.by_name())

    reads_before, services = asyncio.run(scenario())
    assert len(listing.asked) >= 3
    assert reads_before == 0, "a pass read Swarm before the indexes were complete"
    assert services == 1


def test_a_pass_says_where_its_time_went_and_how_long_its_trigger_waited() -> None:
    """The breakdown from a trigger to the writes (issue 22, item 6): each pass's phases."""
    swarm = MemorySwarm(nodes=1)
    result = Reconciler(swarm, Settings()).run_pass(Desired(deployments=[deployment("a")]))
    assert list(result.timings) == ["observe", "plan", "gateways", "apply", "report"]
    assert all(seconds >= 0 for seconds in result.timings.values())
    assert swarm.writes() == 1

    waited = {"phase": "waited"}
    before = metrics.REGISTRY.get_sample_value("npuswarm_pass_phase_seconds_count", waited) or 0
    triggers = Triggers()
    triggers.request("team/a")
    triggers.request("team/b")
    assert triggers.take() == ({"team/a", "team/b"}, True)
    assert triggers.take() == (set(), False)  # nothing waited: nothing observed
    after = metrics.REGISTRY.get_sample_value("npuswarm_pass_phase_seconds_count", waited)
    assert after == before + 1
