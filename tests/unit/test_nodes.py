from __future__ import annotations

import pytest

from npuswarm.core.nodes import node_from_engine
from npuswarm.core.npus import format_npu_ids, parse_npu_ids

from npuswarm.core.pipeline import Desired
from npuswarm.reconcile import Reconciler
from npuswarm.settings import Settings

from .builders import deployment, engine_node
from .memswarm import MemorySwarm


def test_npus_from_generic_resources() -> None:
    info = node_from_engine(engine_node("n", "h", npus=["davinci0", "davinci3", "davinci_manager", "7"]))
    assert info.npus == {0, 3}
    assert info.hostname == "h" and info.accepts_new_replicas


def test_npus_from_label_when_no_generic_resources_and_reserved_are_excluded() -> None:
    info = node_from_engine(
        engine_node("n", "h", labels={"npuswarm.io/npus": "0-7", "npuswarm.io/npus-reserved": "6,7"})
    )
    assert info.npus == frozenset(range(8))
    assert info.usable_npus == frozenset(range(6))


def test_bad_labels_are_problems_that_block_new_replicas_and_keep_the_npus() -> None:
    """A typo in a label must not evict what runs (issue 25, item 6: the node's NPU list was
    emptied, so its replicas moved and its PerNode replicas were removed)."""
    info = node_from_engine(engine_node("n", "h", npus=["davinci0"], labels={"npuswarm.io/npus-reserved": "x"}))
    assert info.npus == frozenset({0}) and not info.accepts_new_replicas
    assert "npus-reserved" in info.problems[0] and "npus-reserved" in info.blocked
    odd = node_from_engine(engine_node("n", "h", npus=["davinci0"], labels={"npuswarm.io/topology": "ring"}))
    assert odd.npus == frozenset({0}) and "unknown" in odd.problems[0]
    assert "no new replicas" in odd.blocked and not odd.accepts_new_replicas


def test_a_bad_label_moves_no_replica_and_places_none_there() -> None:
    swarm = MemorySwarm(nodes=1)
    reconciler = Reconciler(swarm, Settings())
    first = deployment("first")
    reconciler.run_pass(Desired(deployments=[first]))
    swarm.run_all()
    swarm.nodes[0]["Spec"]["Labels"]["npuswarm.io/topology"] = "ring"
    per_node = deployment("everywhere", created="2026-01-02T00:00:00Z", mode="PerNode")
    later = deployment("later", created="2026-01-03T00:00:00Z")
    result = reconciler.run_pass(Desired(deployments=[first, per_node, later]))
    assert result.writes == 0
    assert result.views["default/first"].status.placedReplicas == 1
    unplaced = result.views["default/later"].status.replicaStatuses[0].message or ""
    assert "topology" in unplaced, unplaced


def test_rings_label_and_availability() -> None:
    info = node_from_engine(
        engine_node("n", "h", npus=["davinci1"], labels={"npuswarm.io/topology": "rings-of-4"}, availability="drain")
    )
    assert info.topology == "rings-of-4"
    assert info.drained and not info.accepts_new_replicas


@pytest.mark.parametrize(
    ("text", "ids"), [("0", {0}), ("1,3", {1, 3}), ("0-2,4", {0, 1, 2, 4}), ("a-b", None), ("0-", None)]
)
def test_npu_id_forms(text: str, ids: set[int] | None) -> None:
    if ids is None:
        with pytest.raises(ValueError):
            parse_npu_ids(text)
    else:
        assert parse_npu_ids(text) == ids
        assert parse_npu_ids(format_npu_ids(ids)) == ids


def test_reverse_range_is_an_error() -> None:
    with pytest.raises(ValueError, match="bad NPU range"):
        parse_npu_ids("3-1")
