"""The lab looks like a small cluster of Atlas 800I A2 servers to npuswarm."""

import subprocess

import pytest

import swarmlab

pytestmark = pytest.mark.lab

NPUS = [f"davinci{i}" for i in range(8)]


def test_all_nodes_ready_with_one_manager(swarm_lab, manager):
    nodes = manager.api.nodes()
    assert sorted(n["Description"]["Hostname"] for n in nodes) == sorted(
        n.hostname for n in swarm_lab.nodes
    )
    assert all(n["Status"]["State"] == "ready" for n in nodes)
    managers = [n for n in nodes if n["Spec"]["Role"] == "manager"]
    assert [m["Description"]["Hostname"] for m in managers] == [swarm_lab.manager.hostname]
    assert managers[0]["ManagerStatus"]["Leader"] is True


def test_every_node_advertises_eight_npus(manager):
    for node in manager.api.nodes():
        resources = node["Description"]["Resources"]["GenericResources"]
        named = sorted(
            r["NamedResourceSpec"]["Value"]
            for r in resources
            if r["NamedResourceSpec"]["Kind"] == "NPU"
        )
        assert named == NPUS, node["Description"]["Hostname"]


def test_nodes_carry_atlas_labels_and_the_last_one_rings_of_four(swarm_lab):
    labels = [swarm_lab.swarm_node(k)["Spec"]["Labels"] for k in (1, 2, 3)]
    for plain in labels[:2]:
        assert plain == {
            "npuswarm.io/npu-model": "910B4",
            "npuswarm.io/npu-memory-gib": "32",
            "npuswarm.io/topology": "any",
        }
    assert labels[2]["npuswarm.io/topology"] == "rings-of-4"
    assert labels[2]["npuswarm.io/npu-model"] == "910A"


def test_heartbeat_is_short_so_node_loss_shows_fast(manager):
    assert manager.swarm.attrs["Spec"]["Dispatcher"]["HeartbeatPeriod"] == 1_000_000_000


def test_every_node_has_the_image_and_the_shim_as_default_runtime(swarm_lab):
    for node in swarm_lab.nodes:
        client = swarm_lab.client(node.index)
        assert client.images.get(swarmlab.IMAGE).labels.get(swarmlab.IMAGE_KEY_LABEL)
        info = client.info()
        assert info["DefaultRuntime"] == "ascend"
        assert info["Runtimes"]["ascend"]["path"] == str(swarmlab.SHIM)


def test_nodes_have_no_default_route(swarm_lab):
    for node in swarm_lab.nodes:
        routes = subprocess.run(
            ["ip", "-n", node.netns, "route", "show"], capture_output=True, text=True, check=True
        ).stdout
        assert f"{node.address.rsplit('.', 1)[0]}.0/24" in routes
        assert "default" not in routes


def test_what_the_lab_started_is_in_its_cgroup(swarm_lab):
    pids = set(swarmlab.cgroup_pids(swarm_lab.config.cgroup))
    for node in swarm_lab.nodes:
        assert swarmlab.dockerd_pid(node) in pids
    memory = swarm_lab.memory_kib()
    assert memory["daemons_rss"] > 0
    assert memory["daemons_pss"] <= memory["daemons_rss"]


def test_up_again_returns_the_running_lab_untouched(swarm_lab):
    ids = [swarm_lab.node_id(k) for k in (1, 2, 3)]
    again = swarmlab.up(swarm_lab.config)
    assert again.bring_up_seconds is None  # nothing was started
    assert again.endpoint == swarm_lab.endpoint
    assert [again.node_id(k) for k in (1, 2, 3)] == ids


def test_up_refuses_over_leftovers_and_down_removes_them():
    cfg = swarmlab.LabConfig(name="npslleft", nodes=1)
    subprocess.run(["ip", "netns", "add", "npsl-npslleft-1"], check=True)
    try:
        with pytest.raises(
            swarmlab.LabError, match="leftovers of lab npslleft exist: netns npsl-npslleft-1"
        ):
            swarmlab.up(cfg)
    finally:
        removed = swarmlab.down("npslleft")
    assert removed == ["netns npsl-npslleft-1"]
    assert swarmlab.leftovers(cfg) == []


def test_a_second_session_cannot_take_over_a_live_lab(swarm_lab):
    with (
        pytest.raises(swarmlab.LabError, match="belongs to the live test session"),
        swarmlab.lab_session(name=swarm_lab.name),
    ):
        pass
    assert swarm_lab.client(1).ping()  # the refused session touched nothing
