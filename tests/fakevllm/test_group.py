"""Data parallel groups as vllm-ascend runs them over several nodes, on loopback: a leader
that serves the API, headless members that join it over the rendezvous port, one fate."""

import socket

import pytest

from tests.fakevllm.conftest import free_port
from tests.helpers import wait_for

SERVE = ["org/model-7b", "--served-model-name", "model-7b"]
ASK = {"model": "model-7b", "prompt": "one two", "max_tokens": 2}
# What vllm-ascend's tutorials set on every node; "lo" exists on every Linux host.
TUTORIAL_ENV = {"GLOO_SOCKET_IFNAME": "lo", "TP_SOCKET_IFNAME": "lo", "HCCL_SOCKET_IFNAME": "lo"}


def dp(size, local, rpc_port, start=None, headless=False, model=SERVE) -> list[str]:
    args = [
        *model,
        "--data-parallel-size",
        str(size),
        "--data-parallel-size-local",
        str(local),
        "--data-parallel-address",
        "127.0.0.1",
        "--data-parallel-rpc-port",
        str(rpc_port),
    ]
    if start is not None:
        args += ["--data-parallel-start-rank", str(start)]
    return [*args, "--headless"] if headless else args


def healthy(server) -> bool:
    return server.request("/health").status == 200


def logged(server, text: str) -> bool:
    return text in server.stderr.text()


@pytest.fixture
def group(start_server):
    """A leader (rank 0, NPU 0) and its headless member (rank 1, NPU 3 from 127.0.0.2),
    formed: (leader, member, rendezvous port)."""
    rpc = free_port()
    leader = start_server(dp(2, 1, rpc), npus=[0], env={"ASCEND_VISIBLE_DEVICES": "0"})
    member = start_server(
        dp(2, 1, rpc, start=1, headless=True),
        npus=[3],
        env={"ASCEND_VISIBLE_DEVICES": "3", "HCCL_IF_IP": "127.0.0.2", **TUTORIAL_ENV},
    )
    wait_for(lambda: healthy(leader), "the leader ready")
    return leader, member, rpc


def test_leader_is_ready_only_once_its_member_joined(start_server):
    rpc = free_port()
    leader = start_server(dp(2, 1, rpc), npus=[0], env={"ASCEND_VISIBLE_DEVICES": "0"})
    health = leader.request("/health")
    assert health.status == 503
    assert health.json()["message"] == "waiting for data parallel rank(s) 1 of 2 to join"
    assert leader.request("/v1/completions", ASK).status == 503
    info = leader.request("/fake/group").json()
    assert (info["complete"], info["missing_ranks"]) == (False, [1])
    assert [m["role"] for m in info["members"]] == ["leader"]

    start_server(
        dp(2, 1, rpc, start=1, headless=True),
        npus=[3],
        env={"ASCEND_VISIBLE_DEVICES": "3", "HCCL_IF_IP": "127.0.0.2", **TUTORIAL_ENV},
    )
    wait_for(lambda: healthy(leader), "the leader ready once rank 1 joined")
    assert leader.request("/v1/completions", ASK).status == 200

    info = leader.request("/fake/group").json()
    assert (info["complete"], info["missing_ranks"]) == (True, [])
    assert (info["data_parallel_size"], info["data_parallel_rpc_port"]) == (2, rpc)
    first, second = info["members"]
    assert (first["role"], first["ranks"], first["devices"]) == ("leader", [0], ["davinci0"])
    assert first["ASCEND_VISIBLE_DEVICES"] == "0"
    assert second["role"] == "member"
    assert (second["ranks"], second["start_rank"], second["local_size"]) == ([1], 1, 1)
    assert second["state"] == "ready"
    # The member connects from, and advertises, its HCCL_IF_IP.
    assert (second["address"], second["peer"]) == ("127.0.0.2", "127.0.0.2")
    assert second["devices"] == ["davinci3"]
    assert second["ASCEND_VISIBLE_DEVICES"] == "3"
    assert second["env"] == {"HCCL_IF_IP": "127.0.0.2", **TUTORIAL_ENV}
    assert "--headless" in second["args"]
    assert second["args"][second["args"].index("--data-parallel-start-rank") + 1] == "1"
    assert second["hostname"] == socket.gethostname()
    # Every rank is an engine of the leader's API, with its own series.
    metrics = leader.request("/metrics").body.decode()
    assert 'vllm:num_requests_waiting{model_name="model-7b",engine="1"} 0' in metrics


def test_member_started_before_its_leader_joins_it(start_server):
    rpc = free_port()
    member = start_server(dp(2, 1, rpc, start=1, headless=True), npus=[1])
    wait_for(lambda: logged(member, "no data parallel leader at"), "the member retrying")
    leader = start_server(dp(2, 1, rpc), npus=[0])
    wait_for(lambda: healthy(leader), "the leader ready")
    assert member.proc.poll() is None


@pytest.mark.parametrize("stop", ["kill", "terminate"])
def test_losing_the_member_stops_the_leader(group, stop):
    leader, member, _ = group
    getattr(member.proc, stop)()
    code, err = leader.wait_exit()
    assert code == 1
    assert "error: data parallel rank 1 lost (" in err


def test_losing_the_leader_stops_its_member(group):
    leader, member, rpc = group
    leader.proc.kill()
    code, err = member.wait_exit()
    assert code == 1
    assert f"error: data parallel leader at 127.0.0.1:{rpc} lost" in err


def test_stopping_the_leader_drains_then_closes_the_group(group):
    leader, member, _ = group
    leader.proc.terminate()
    assert leader.wait_exit()[0] == 0
    code, err = member.wait_exit()
    assert code == 1
    assert "it stopped the group (the leader was stopped)" in err


def test_an_unexpected_rank_is_refused_and_fails_the_leader(start_server):
    rpc = free_port()
    leader = start_server(dp(4, 2, rpc), npus=[0, 1])  # ranks 0 and 1
    member = start_server(dp(4, 2, rpc, start=1, headless=True), npus=[0, 1])  # 1 and 2
    code, err = member.wait_exit()
    assert code == 1
    assert "refused: Message from engine with unexpected data parallel rank: 1" in err
    code, err = leader.wait_exit()
    assert code == 1
    assert "Message from engine with unexpected data parallel rank: 1" in err


def test_a_rank_taken_twice_is_refused(start_server):
    rpc = free_port()
    leader = start_server(dp(2, 1, rpc), npus=[0])
    # Still loading: joined, not ready, so the leader still listens.
    first = start_server(
        dp(2, 1, rpc, start=1, headless=True), npus=[1], env={"FAKE_VLLM_LOAD_SECONDS": "600"}
    )

    def joined() -> bool:
        members = leader.request("/fake/group").json()["members"]
        return [m["state"] for m in members] == ["ready", "joined"]

    wait_for(joined, "rank 1 joined and loading")
    second = start_server(dp(2, 1, rpc, start=1, headless=True), npus=[2])
    code, err = second.wait_exit()
    assert (code, "unexpected data parallel rank: 1" in err) == (1, True)
    assert leader.wait_exit()[0] == 1
    assert first.wait_exit()[0] == 1


@pytest.mark.parametrize(
    ("member_args", "npus", "message"),
    [
        (dp(4, 1, "{rpc}", start=1, headless=True), [1], "--data-parallel-size 4, the leader"),
        (
            [*dp(2, 1, "{rpc}", start=1, headless=True), "--tensor-parallel-size", "2"],
            [1, 2],
            "--tensor-parallel-size 2, the leader with 1",
        ),
        (
            dp(2, 1, "{rpc}", start=1, headless=True, model=["org/other"]),
            [1],
            "model org/other, the leader with org/model-7b",
        ),
    ],
)
def test_a_member_configured_otherwise_is_refused(start_server, member_args, npus, message):
    rpc = free_port()
    leader = start_server(dp(2, 1, rpc), npus=[0])
    member = start_server([a.format(rpc=rpc) for a in member_args], npus=npus)
    code, err = member.wait_exit()
    assert code == 1
    assert "refused: the member on " in err and message in err
    assert leader.wait_exit()[0] == 1


def test_a_member_without_leader_gives_up(start_server):
    rpc = free_port()
    member = start_server(
        dp(2, 1, rpc, start=1, headless=True), env={"FAKE_VLLM_DP_CONNECT_SECONDS": "1"}
    )
    code, err = member.wait_exit()
    assert code == 1
    assert f"no data parallel leader answered at 127.0.0.1:{rpc} within 1s" in err


def test_a_member_after_the_group_formed_finds_no_leader(group, start_server):
    # As vLLM's front-end, the leader stops listening once its engines are up.
    leader, _, rpc = group
    late = start_server(
        dp(2, 1, rpc, start=1, headless=True), env={"FAKE_VLLM_DP_CONNECT_SECONDS": "1"}
    )
    code, err = late.wait_exit()
    assert code == 1
    assert "no data parallel leader answered" in err
    assert healthy(leader)


def test_a_stray_connection_to_the_rendezvous_port_is_ignored(start_server):
    rpc = free_port()
    leader = start_server(dp(2, 1, rpc), npus=[0])
    with socket.create_connection(("127.0.0.1", rpc), timeout=5) as stray:
        stray.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
    wait_for(lambda: logged(leader, "no hello"), "the stray connection ignored")
    start_server(dp(2, 1, rpc, start=1, headless=True), npus=[1])
    wait_for(lambda: healthy(leader), "the leader ready")


def test_a_server_alone_is_a_group_of_one(start_server):
    server = start_server(SERVE)
    info = server.request("/fake/group").json()
    assert (info["complete"], info["data_parallel_size"]) == (True, 1)
    assert [(m["role"], m["ranks"]) for m in info["members"]] == [("leader", [0])]
    assert server.request("/npus").json()["data_parallel"]["data_parallel_size"] == 1


def test_all_ranks_on_one_node_need_no_members(start_server):
    server = start_server([*SERVE, "--data-parallel-size", "2"], npus=[0, 1])
    assert healthy(server)
    assert server.request("/fake/group").json()["members"][0]["ranks"] == [0, 1]


@pytest.mark.parametrize(
    ("args", "npus", "message"),
    [
        (
            ["--data-parallel-size", "3", "--data-parallel-size-local", "2"],
            [0, 1],
            "--data-parallel-size 3 is not a multiple of --data-parallel-size-local 2",
        ),
        (
            ["--data-parallel-size", "2", "--data-parallel-size-local", "4"],
            [0, 1, 2, 3],
            "--data-parallel-size-local 4 is larger than --data-parallel-size 2",
        ),
        (
            [
                "--data-parallel-size",
                "2",
                "--data-parallel-size-local",
                "1",
                "--data-parallel-start-rank",
                "1",
            ],
            [0],
            "--data-parallel-start-rank 1 is only for --headless members",
        ),
        (
            ["--data-parallel-size", "2", "--data-parallel-size-local", "1", "--headless"],
            [0],
            "a --headless member needs --data-parallel-start-rank > 0",
        ),
        (
            [
                "--data-parallel-size",
                "2",
                "--data-parallel-size-local",
                "1",
                "--headless",
                "--data-parallel-start-rank",
                "2",
            ],
            [0],
            "--data-parallel-start-rank 2 with --data-parallel-size-local 1 gives ranks 2, "
            "outside --data-parallel-size 2 (ranks 0..1)",
        ),
        (
            [
                "--data-parallel-size",
                "4",
                "--data-parallel-size-local",
                "0",
                "--headless",
                "--data-parallel-start-rank",
                "2",
            ],
            [0],
            "data_parallel_size_local must be > 0 in headless mode",
        ),
        (
            [
                "--data-parallel-size",
                "4",
                "--data-parallel-size-local",
                "2",
                "--tensor-parallel-size",
                "2",
            ],
            [0, 1, 2],
            "--data-parallel-size-local 2 x --tensor-parallel-size 2 needs 4 NPUs but only 3 "
            "usable: davinci0,davinci1,davinci2",
        ),
    ],
)
def test_a_bad_layout_is_refused(start_server, args, npus, message):
    server = start_server([*SERVE, *args], npus=npus)
    code, err = server.wait_exit()
    assert code == 1
    assert f"fake-vllm: error: {message}" in err


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"GLOO_SOCKET_IFNAME": "lo,nosuch0"},
            "GLOO_SOCKET_IFNAME=lo,nosuch0: no network interface nosuch0",
        ),
        ({"TP_SOCKET_IFNAME": "nosuch0"}, "TP_SOCKET_IFNAME=nosuch0: no network interface nosuch0"),
        ({"HCCL_SOCKET_IFNAME": "=l"}, "HCCL_SOCKET_IFNAME==l matches no network interface"),
        # 192.0.2.0/24 is TEST-NET-1: never an address of this host.
        ({"HCCL_IF_IP": "192.0.2.1"}, "HCCL_IF_IP=192.0.2.1 is not an address of this host"),
    ],
)
def test_bad_communication_settings_are_refused(start_server, env, message):
    server = start_server(SERVE, env=env)
    code, err = server.wait_exit()
    assert code == 1
    assert message in err


def test_communication_settings_are_logged(start_server):
    # HCCL_SOCKET_IFNAME takes prefixes: "l" matches lo.
    server = start_server(SERVE, env={"HCCL_SOCKET_IFNAME": "l", "HCCL_BUFFSIZE": "1024"})
    assert healthy(server)
    wait_for(
        lambda: logged(server, "communication settings: HCCL_SOCKET_IFNAME=l HCCL_BUFFSIZE=1024"),
        "the settings logged",
    )
