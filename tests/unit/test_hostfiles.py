"""Host paths on the nodes: the agent's resolution as the host would do it (a real directory
tree standing for a node's filesystem) and what placement makes of the agents' reports."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from npuswarm.core import hostfiles
from npuswarm.core.hostfiles import PathCheck
from npuswarm.core.nodes import NodeLimits
from npuswarm.core.placement import Allocation, place_all
from npuswarm.nodehealth import pathcheck
from npuswarm.nodehealth.pathcheck import HostView

from .builders import NOW, deployment, node


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A node's filesystem: /models with one model, /data beside it, /etc outside."""
    (tmp_path / "models" / "qwen").mkdir(parents=True)
    (tmp_path / "models" / "qwen" / "config.json").write_bytes(b"{}")
    (tmp_path / "models" / "qwen" / "model.safetensors").write_bytes(b"w" * 1000)
    (tmp_path / "data").mkdir()
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "shadow").write_text("secret")
    return tmp_path


def check(host: Path, path: str) -> dict[str, object]:
    return pathcheck.check(path, ("/models", "/data"), HostView(str(host)))


def test_a_plain_model_directory_exists_with_its_size(host: Path) -> None:
    found = check(host, "/models/qwen")
    assert found == {"exists": True, "root": "/models", "size": 1002, "files": 2,
                     "truncated": False}


def test_a_missing_path_and_a_path_through_a_file_are_missing(host: Path) -> None:
    assert check(host, "/models/llama")["exists"] is False
    assert check(host, "/models/qwen/config.json/x")["exists"] is False
    assert "escapes" not in check(host, "/models/llama")


def test_a_link_to_the_hosts_root_escapes_as_the_host_would_follow_it(host: Path) -> None:
    """`ln -s / /models/x`: the target "/" is the node's root, not the agent's."""
    os.symlink("/", host / "models" / "x")
    found = check(host, "/models/x")
    assert found["escapes"] == "/" and found["root"] == "/models"
    assert check(host, "/models/x/etc")["escapes"] == "/etc"


def test_relative_links_that_climb_out_escape_and_those_inside_stay(host: Path) -> None:
    os.symlink("../etc", host / "models" / "up")
    os.symlink("qwen", host / "models" / "alias")
    os.symlink("/models/qwen", host / "models" / "absolute")
    assert check(host, "/models/up")["escapes"] == "/etc"
    for inside in ("/models/alias", "/models/absolute"):
        found = check(host, inside)
        assert found["exists"] is True and "escapes" not in found
        assert found["size"] == 1002


def test_a_link_into_another_allowed_root_leaves_its_own_root(host: Path) -> None:
    """A writable /data reached through a read-only /models would change what the mount is."""
    os.symlink("/data", host / "models" / "sideways")
    assert check(host, "/models/sideways")["escapes"] == "/data"


def test_a_link_hidden_in_a_middle_component_is_found(host: Path) -> None:
    (host / "models" / "team").mkdir()
    os.symlink("../../etc", host / "models" / "team" / "weights")
    assert check(host, "/models/team/weights/shadow")["escapes"] == "/etc/shadow"


def test_a_link_loop_is_an_error_not_a_hang(host: Path) -> None:
    os.symlink("b", host / "models" / "a")
    os.symlink("a", host / "models" / "b")
    found = check(host, "/models/a")
    assert found["exists"] is False and "symbolic links" in str(found["error"])


def test_a_path_outside_the_roots_is_not_looked_at(host: Path) -> None:
    assert check(host, "/etc/shadow") == {
        "exists": False, "error": "outside the agent's allowed roots"}


def test_the_listing_counts_hugging_face_snapshot_links_and_stops_at_its_bound(
    host: Path,
) -> None:
    cache = host / "models" / "hub" / "models--q"
    (cache / "blobs").mkdir(parents=True)
    (cache / "snapshots" / "abc").mkdir(parents=True)
    for index in range(5):
        (cache / "blobs" / f"b{index}").write_bytes(b"x" * 100)
        os.symlink(f"../../blobs/b{index}", cache / "snapshots" / "abc" / f"f{index}")
    os.symlink("/etc/shadow", cache / "snapshots" / "abc" / "leak")
    view = HostView(str(host))
    whole = pathcheck.list_size("/models/hub/models--q/snapshots/abc", "/models", view)
    assert (whole.files, whole.size, whole.truncated) == (5, 500, False)
    bounded = pathcheck.list_size("/models/hub", "/models", view, max_entries=3)
    assert bounded.truncated


def test_the_checker_resolves_every_time_but_lists_once_per_interval(host: Path) -> None:
    now = [0.0]
    checker = pathcheck.PathChecker(("/models",), HostView(str(host)), 30.0, lambda: now[0])
    assert checker.answer(["/models/qwen"])["/models/qwen"]["size"] == 1002
    (host / "models" / "qwen" / "more").write_bytes(b"y" * 10)
    assert checker.answer(["/models/qwen"])["/models/qwen"]["size"] == 1002  # kept
    os.rename(host / "models" / "qwen", host / "models" / "gone")
    os.symlink("/", host / "models" / "qwen")
    assert checker.answer(["/models/qwen"])["/models/qwen"]["escapes"] == "/"
    now[0] = 31.0
    os.unlink(host / "models" / "qwen")
    os.rename(host / "models" / "gone", host / "models" / "qwen")
    assert checker.answer(["/models/qwen"])["/models/qwen"]["size"] == 1012


# --- what placement makes of the reports ------------------------------------------------


def weights(name: str = "qwen", **spec: object):
    body = {"model": "/weights/qwen", "volumes": [{"hostPath": "/models", "mountPath": "/weights"}],
            "npusPerReplica": 8, **spec}
    return deployment(name, **body)


def test_the_paths_asked_are_the_volumes_and_the_model_inside_one() -> None:
    needed = hostfiles.needed_paths(weights())
    assert [(p.path, p.what) for p in needed] == [
        ("/models", "hostPath"), ("/models/qwen", "model")]
    assert hostfiles.needed_paths(deployment("plain", model="Qwen/Qwen3-8B")) == ()


def test_paths_by_node_follow_the_selectors_and_are_bounded() -> None:
    nodes = [node("n1", labels={"pool": "a"}), node("n2")]
    asked = hostfiles.paths_by_node(
        [weights(), weights("b", nodeSelector={"pool": "a"}, model="/weights/b")], nodes)
    assert asked == {"n1": ("/models", "/models/b", "/models/qwen"),
                     "n2": ("/models", "/models/qwen")}
    assert len(hostfiles.paths_by_node([weights()], nodes, limit=1)["n1"]) == 1


HAS = PathCheck(exists=True, size=10, files=1, root="/models")
MISSING = PathCheck(exists=False, root="/models")


def placed(md, nodes, files, allocations=()):
    return place_all([md], nodes, list(allocations), now=NOW, lost_node_grace_seconds=60,
                     limits=NodeLimits(files=files))


def test_a_node_lacking_the_models_files_gets_no_replica_when_another_has_them() -> None:
    nodes = [node("n1", hostname="atlas-1"), node("n2", hostname="atlas-2")]
    # atlas-1 is first by hostname and would be chosen; it lacks the model.
    files = {"n1": {"/models": HAS, "/models/qwen": MISSING},
             "n2": {"/models": HAS, "/models/qwen": HAS}}
    result = placed(weights(replicas=1), nodes, files)
    assert [a.node_id for a in result.assignments.values()] == ["n2"]


def test_when_no_node_has_them_the_status_says_so_per_node() -> None:
    nodes = [node("n1", hostname="atlas-1"), node("n2", hostname="atlas-2")]
    files = {n: {"/models": HAS, "/models/qwen": MISSING} for n in ("n1", "n2")}
    result = placed(weights(replicas=1), nodes, files)
    (unplaced,) = result.unplaced.values()
    assert unplaced.reason == "HostFilesUnavailable"
    assert "model /models/qwen missing on atlas-1" in unplaced.message
    assert "model /models/qwen missing on atlas-2" in unplaced.message


def test_unchecked_paths_wait_for_the_agent_and_no_agents_means_no_check() -> None:
    nodes = [node("n1")]
    result = placed(weights(replicas=1), nodes, {})
    (unplaced,) = result.unplaced.values()
    assert unplaced.reason == "NodeValidationPending" and "not yet checked" in unplaced.message
    unchecked = place_all([weights(replicas=1)], nodes, [], now=NOW,
                          lost_node_grace_seconds=60, limits=NodeLimits(files=None))
    assert len(unchecked.assignments) == 1


def test_an_escaping_path_refuses_the_node_and_moves_a_replica_running_there() -> None:
    nodes = [node("n1", hostname="atlas-1"), node("n2", hostname="atlas-2")]
    escape = PathCheck(exists=False, root="/models", escapes="/")
    files = {"n1": {"/models": HAS, "/models/qwen": escape},
             "n2": {"/models": HAS, "/models/qwen": HAS}}
    running = Allocation(deployment="default/qwen", slot="0", node_id="n1",
                         npus=frozenset(range(8)), service="qwen-0")
    result = placed(weights(replicas=1), nodes, files, [running])
    assert "resolves to / on atlas-1" in result.moved[("default/qwen", "0")]
    assert [a.node_id for a in result.assignments.values()] == ["n2"]


def test_a_missing_path_never_moves_a_replica_that_runs() -> None:
    nodes = [node("n1"), node("n2")]
    files = {"n1": {"/models": HAS, "/models/qwen": MISSING},
             "n2": {"/models": HAS, "/models/qwen": HAS}}
    running = Allocation(deployment="default/qwen", slot="0", node_id="n1",
                         npus=frozenset(range(8)), service="qwen-0")
    result = placed(weights(replicas=1), nodes, files, [running])
    assert result.assignments[("default/qwen", "0")].kept


def test_replicas_share_the_node_with_the_files_and_the_rest_say_which_node_lacks_them() -> None:
    nodes = [node("n1", 16, hostname="atlas-1"), node("n2", hostname="atlas-2")]
    files = {"n1": {"/models": HAS, "/models/qwen": HAS},
             "n2": {"/models": HAS, "/models/qwen": MISSING}}
    result = placed(weights(replicas=3), nodes, files)
    assert sorted(a.node_id for a in result.assignments.values()) == ["n1", "n1"]
    (unplaced,) = result.unplaced.values()
    assert unplaced.reason == "HostFilesUnavailable"
    assert "the most free on a matching node is 0" in unplaced.message
    assert "model /models/qwen missing on atlas-2" in unplaced.message


def test_a_path_checks_problem_is_worded_once_for_status_and_cli() -> None:
    assert PathCheck(exists=True, size=1, files=1).problem("/models/q", "atlas-1") == ""
    assert PathCheck(exists=False).problem("/models/q", "atlas-1", "model") == (
        "model /models/q missing on atlas-1")
    assert PathCheck(exists=False).problem("/models/q", "atlas-1") == "/models/q missing on atlas-1"
    assert PathCheck(exists=False, error="permission denied").problem("/models/q", "atlas-1") == (
        "/models/q unreadable on atlas-1: permission denied")
    escaped = PathCheck(exists=True, root="/models", escapes="/etc")
    assert escaped.problem("/models/x", "atlas-1", "hostPath") == (
        "hostPath /models/x resolves to /etc on atlas-1, outside its allowed root /models: "
        "refused on that node")
