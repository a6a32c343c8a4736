"""A deployment in one namespace never selects, updates or removes another namespace's services,
whatever names it picks: services are found by owner labels, and a name taken by a neighbour
gives a new service another name instead of a refused create."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from npuswarm.core.snapshot import snapshot_from_engine
from npuswarm.core.pipeline import plan_pass
from npuswarm.core.render import service_name

from .builders import NOW, deployment, engine_node, engine_service, engine_task
from .test_diff import converge, plan_for

NODES = [engine_node("node-a", "a", npus=[f"davinci{i}" for i in range(8)])]


def test_dashed_names_collide_across_namespaces_and_the_newcomer_gets_its_own_name() -> None:
    theirs = deployment("b", namespace="c-a")
    ours = deployment("a-b", namespace="c")
    assert service_name(theirs, "0") == service_name(ours, "0") == "c-a-b-0"
    services, tasks = converge(theirs)
    plan, _ = plan_for(ours, services, tasks, others=[theirs])
    (create,) = plan.actions
    assert create.kind == "create" and create.service_name != "c-a-b-0"
    assert create.service_name.startswith("c-a-b-") and create.service_name.endswith("-0")
    assert create.spec is not None
    assert create.spec["Labels"]["npuswarm.io/owner-namespace"] == "c"
    assert create.spec["Labels"]["npuswarm.io/owner-name"] == "a-b"

    # Once both run, each deployment's plan is empty: neither adopts nor fights the other.
    ours_services = [engine_service(create.spec, "ours-id")]
    ours_tasks = [engine_task("ours-id", create.spec, task_id="t-ours")]
    everything = services + ours_services
    all_tasks = tasks + ours_tasks
    for md, other in ((ours, theirs), (theirs, ours)):
        plan, snapshot = plan_for(md, everything, all_tasks, others=[other])
        assert plan.actions == [] and plan.deferred == []
        assert {s.id for s in snapshot.services_of(md.key)} == (
            {"ours-id"} if md is ours else {s["ID"] for s in services}
        )


def test_deleting_or_scaling_to_zero_touches_only_its_own_services() -> None:
    theirs = deployment("b", namespace="c-a", replicas=2)
    services, tasks = converge(theirs)
    ours = deployment("a-b", namespace="c", replicas=0)
    plan, _ = plan_for(ours, services, tasks, others=[theirs])
    assert plan.actions == []


names = st.text(alphabet="ab-", min_size=1, max_size=5).filter(
    lambda s: not s.startswith("-") and not s.endswith("-")
)


@settings(max_examples=200, deadline=None)
@given(names, names, names, names, st.integers(0, 3), st.integers(0, 3))
def test_no_plan_ever_acts_on_a_service_of_another_deployment(
    ns_a: str, name_a: str, ns_b: str, name_b: str, replicas_a: int, replicas_b: int
) -> None:
    a = deployment(name_a, namespace=ns_a, replicas=replicas_a, created="2026-01-01T00:00:00Z")
    b = deployment(name_b, namespace=ns_b, replicas=replicas_b, created="2026-01-02T00:00:00Z")
    if a.key == b.key:
        return
    services, tasks = converge(a)
    owned_by_a = {s["ID"] for s in services}
    plan, snapshot = plan_for(b, services, tasks, others=[a])
    for action in plan.actions + plan.deferred:
        assert action.service_id not in owned_by_a
        if action.kind == "create":
            assert action.service_name not in snapshot.names()
    # And a's own plan, with b's new services in Swarm, still leaves b's alone.
    b_services = [
        engine_service(action.spec, f"b{index}")
        for index, action in enumerate(plan.actions)
        if action.kind == "create" and action.spec is not None
    ]
    b_ids = {s["ID"] for s in b_services}
    both = snapshot_from_engine(NODES, services + b_services, tasks, [])
    again = plan_pass([a, b], both, now=NOW, lost_node_grace_seconds=60).plans[a.key]
    assert not {x.service_id for x in again.actions + again.deferred} & b_ids
