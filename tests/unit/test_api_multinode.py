"""The multi-node replica API (issue 20): the data-parallel/tensor-parallel/NPU rule."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from npuswarm.api.deployment import ModelDeploymentSpec

BASE: dict[str, Any] = {"image": "img", "model": "/models/m"}


def spec(**fields: Any) -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate({**BASE, **fields})


def test_a_single_node_spec_is_unchanged_and_asks_for_no_data_parallel() -> None:
    one = spec(npusPerReplica=8, engine={"tensorParallelSize": 4})
    assert one.nodesPerReplica == 1 and not one.multi_node
    assert one.data_parallel_size == 1
    # Single-node users may still pass their own DP flags: nothing renders them for them.
    assert spec(engine={"extraArgs": ["--data-parallel-size", "2"]}).engine.extraArgs


def test_data_parallel_size_defaults_to_nodes_times_local_ranks() -> None:
    group = spec(nodesPerReplica=2, npusPerReplica=8, engine={"tensorParallelSize": 4})
    assert group.data_parallel_size == 4  # 2 nodes x (8 NPUs / TP 4) ranks
    assert group.npus_per_replica == 8  # on each node


def test_the_tutorial_shape_is_accepted() -> None:
    # vllm-ascend multi_node.md: DP 4 over 2 nodes, 2 local ranks of TP 4 = 8 NPUs per node.
    group = spec(
        nodesPerReplica=2,
        npusPerReplica=8,
        engine={"tensorParallelSize": 4, "dataParallelSize": 4},
    )
    assert group.data_parallel_size == 4


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"nodesPerReplica": 4, "engine": {"dataParallelSize": 6}},
            "engine.dataParallelSize=6 must be a multiple of nodesPerReplica=4",
        ),
        (
            {
                "nodesPerReplica": 2,
                "npusPerReplica": 8,
                "engine": {"tensorParallelSize": 4, "dataParallelSize": 8},
            },
            "npusPerReplica=8 (NPUs on each node) must equal engine.dataParallelSize/"
            "nodesPerReplica x engine.tensorParallelSize = 8/2 x 4 = 16",
        ),
        (
            {"npusPerReplica": 4, "engine": {"tensorParallelSize": 2, "dataParallelSize": 1}},
            "= 1/1 x 2 = 2",
        ),
        ({"nodesPerReplica": 2, "mode": "PerNode"}, "nodesPerReplica > 1 needs mode=Replicated"),
        ({"nodesPerReplica": 2, "network": {"name": "net"}}, "runs on the host network"),
        ({"nodesPerReplica": 2, "publish": {"port": 8000}}, "runs on the host network"),
        (
            {"nodesPerReplica": 2, "engine": {"extraArgs": ["--headless"]}},
            "extraArgs must not set --headless",
        ),
        (
            {"engine": {"dataParallelSize": 1, "extraArgs": ["--data_parallel_rpc_port=1"]}},
            "extraArgs must not set --data_parallel_rpc_port",
        ),
        ({"nodesPerReplica": 0}, "nodesPerReplica"),
        ({"nodesPerReplica": 2, "groupTopologyKey": "not a label"}, "groupTopologyKey"),
    ],
)
def test_mismatched_groups_are_refused_naming_the_mismatch(
    fields: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ValidationError) as error:
        spec(**fields)
    assert expected in str(error.value)


def test_fixed_npu_ids_on_a_group_follow_the_same_rule_on_every_member() -> None:
    group = spec(nodesPerReplica=2, npusPerReplica=4, npuIds=[0, 1, 2, 3])
    assert group.npuIds == [0, 1, 2, 3]
    with pytest.raises(ValidationError, match="npuIds must name|npuIds names"):
        spec(nodesPerReplica=2, npusPerReplica=4, npuIds=[0, 1])


def test_a_label_key_with_a_prefix_is_a_topology_key() -> None:
    assert spec(nodesPerReplica=2, groupTopologyKey="npuswarm.io/switch").groupTopologyKey
