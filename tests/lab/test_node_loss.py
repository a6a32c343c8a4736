"""Node loss as npuswarm must see it: a worker's dockerd dies or its network goes."""

import pytest

pytestmark = pytest.mark.lab

DOWN_DEADLINE = 15.0  # heartbeat 1s: the manager gives up on a node after a few seconds
READY_DEADLINE = 30.0


def test_killed_dockerd_marks_the_node_down_and_restart_brings_it_back(swarm_lab, manager):
    swarm_lab.kill_dockerd(3)
    # wait_node_state fails the test at the deadline; the time taken is a figure, not a check.
    swarm_lab.wait_node_state(3, "down", DOWN_DEADLINE)
    assert swarm_lab.swarm_node(2)["Status"]["State"] == "ready"  # only the lost node
    swarm_lab.start_dockerd(3)
    swarm_lab.wait_node_state(3, "ready", READY_DEADLINE)
    assert swarm_lab.client(3).info()["Swarm"]["LocalNodeState"] == "active"


def test_cut_network_marks_the_node_down_and_restoring_it_brings_it_back(swarm_lab):
    swarm_lab.disconnect(2)
    try:
        swarm_lab.wait_node_state(2, "down", DOWN_DEADLINE)
    finally:
        swarm_lab.reconnect(2)
    swarm_lab.wait_node_state(2, "ready", READY_DEADLINE)
