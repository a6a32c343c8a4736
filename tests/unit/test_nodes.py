from __future__ import annotations

import pytest

from npuswarm.core.nodes import node_from_engine
from npuswarm.core.npus import format_npu_ids, parse_npu_ids

from .builders import engine_node


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


def test_bad_labels_are_problems_not_crashes_and_give_no_npus() -> None:
    info = node_from_engine(engine_node("n", "h", npus=["davinci0"], labels={"npuswarm.io/npus-reserved": "x"}))
    assert info.npus == frozenset()
    assert "npus-reserved" in info.problems[0]
    odd = node_from_engine(engine_node("n", "h", npus=["davinci0"], labels={"npuswarm.io/topology": "ring"}))
    assert odd.npus == frozenset() and "unknown" in odd.problems[0]


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
