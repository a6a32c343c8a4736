"""Issue 12, HA: two operator processes peered as the production overlay runs them (not
--standalone). Exactly one acts; SIGKILL it and the other takes over within the documented
time (the peering lifetime, one leadership poll and the hold, docs/reliability.md); the
invariants hold.

The session's standalone operator is stopped for the test and started again after it, so that
exactly the two peers watch the cluster.
"""

from __future__ import annotations

import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests import invariants
from tests.faultproxy import FaultProxy
from tests.e2e.conftest import (
    INSTANCE,
    REPO,
    Cluster,
    _answers,
    free_port,
    operator_image,
    operatorimage,
    wait_md,
)
from tests.e2e.test_chaos import deployments, owned_services
from tests.e2e.test_outages import apply, ready_with
from tests.helpers import wait_for

pytestmark = pytest.mark.e2e

LIFETIME = 15  # NPUSWARM_PEERING_LIFETIME_SECONDS, the smallest allowed
LEADERSHIP_POLL = 2.0  # runtime.LEADERSHIP_POLL_SECONDS
DOCKER_TIMEOUT = 5  # NPUSWARM_DOCKER_TIMEOUT_SECONDS in the e2e operators (conftest)
# The new leader waits out the old one's last possible write: Docker's timeout, a poll and the
# lease margin (runtime/leadership.py).
HOLD = DOCKER_TIMEOUT + LEADERSHIP_POLL + 4
# The documented bound: the dead leader's record expires, the standby's next poll, the hold.
TAKEOVER_DEADLINE = LIFETIME + LEADERSHIP_POLL + HOLD + 5  # + 5: the pass and a scrape


@dataclass
class Peer:
    name: str
    priority: int
    metrics_url: str
    process: subprocess.Popen[bytes]
    log: Path

    def gauge(self, metric: str) -> float | None:
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=2) as response:
                text = response.read().decode()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith(metric + " "):
                return float(line.rsplit(" ", 1)[1])
        return None

    def wrote(self) -> int:
        return self.log.read_text(errors="replace").count('"event": "service written"')


def start_peer(
    cluster: Cluster, sa_dir: Path, priority: int, directory: Path, server: str | None = None
) -> Peer:
    name = f"npuswarm-ha-{priority}-{uuid.uuid4().hex[:6]}"
    metrics_port, health = free_port(), f"http://127.0.0.1:{free_port()}/healthz"
    # The session operator's settings (this installation, its relay, no node validation on
    # the plain-runc local Swarm), each peer its own metrics port.
    env = {
        **cluster.operator_env,
        "NPUSWARM_METRICS_PORT": str(metrics_port),
        "NPUSWARM_PEERING_LIFETIME_SECONDS": str(LIFETIME),
    }
    # The production overlay's arguments (components/peering), each peer its own priority.
    argv = operatorimage.docker_run_args(
        operator_image(), name, server or cluster.plane.server, sa_dir, env,
        ["run", f"--liveness={health}", "--log-format=json", "--peering-name=npuswarm",
         f"--priority={priority}"],
    )
    log = directory / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(["docker", *argv], stdout=out, stderr=subprocess.STDOUT)
    peer = Peer(name, priority, f"http://127.0.0.1:{metrics_port}/metrics", process, log)
    wait_for(lambda: _answers(health) or process.poll() is not None, f"{name}'s liveness", timeout=60)
    assert process.poll() is None, log.read_text(errors="replace")[-3000:]
    return peer


def stop_peer(peer: Peer, signal: str = "TERM") -> None:
    subprocess.run(["docker", "kill", "--signal", signal, peer.name], capture_output=True, check=False)
    try:
        peer.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        peer.process.kill()
    subprocess.run(["docker", "rm", "--force", peer.name], capture_output=True, check=False)


@pytest.fixture
def api_relay(cluster: Cluster) -> Iterator[FaultProxy]:
    """The leader's own way to the API server, to cut it off while Swarm stays reachable."""
    url = urlsplit(cluster.plane.server)
    relay = FaultProxy(f"{url.hostname}:{url.port}")
    relay.start()
    yield relay
    relay.stop()


@pytest.fixture
def peers(cluster: Cluster, tmp_path: Path, api_relay: FaultProxy) -> Iterator[list[Peer]]:
    component = REPO / "manifests" / "components" / "peering"
    for part in ("peering-crd.yaml", "rbac.yaml"):
        cluster.kubectl("apply", "-f", str(component / part))
    cluster.kubectl("wait", "--for=condition=Established", "crd/clusterkopfpeerings.kopf.dev",
                    "--timeout=60s")
    token = cluster.kubectl("-n", "npuswarm-system", "create", "token", "npuswarm",
                            "--duration=1h").stdout.strip()
    sa_dir = operatorimage.service_account_dir(tmp_path / "sa", token, cluster.plane.ca_file)
    cluster.kill_operator()
    started: list[Peer] = []
    try:
        started.append(
            start_peer(cluster, sa_dir, 20, tmp_path, f"https://127.0.0.1:{api_relay.port}")
        )
        started.append(start_peer(cluster, sa_dir, 10, tmp_path))
        yield started
    finally:
        for peer in started:
            stop_peer(peer)
            print(f"--- {peer.name}\n{peer.log.read_text(errors='replace')[-2500:]}")
        cluster.start_operator()


def test_two_peered_operators_one_acts_and_the_standby_takes_over_a_killed_leader(
    cluster: Cluster, namespace: str, peers: list[Peer]
) -> None:
    leader, standby = peers
    wait_for(lambda: leader.gauge("npuswarm_leader") == 1, "the higher priority to lead", timeout=60)
    wait_for(lambda: standby.gauge("npuswarm_leader") == 0, "the lower priority to stand by", timeout=30)
    record = cluster.kubectl("get", "clusterkopfpeering", "npuswarm", "-o",
                             "jsonpath={.status}").stdout
    assert f'"lifetime":{LIFETIME}' in record.replace(" ", ""), record

    apply(cluster, namespace, "ha")
    wait_md(cluster, namespace, "ha", ready_with(1), "Ready, served by the leader")
    assert leader.wrote() >= 1 and standby.wrote() == 0, "the standby wrote to Swarm"
    assert standby.gauge("npuswarm_leader") == 0

    stop_peer(leader, "KILL")
    killed = time.monotonic()
    apply(cluster, namespace, "ha", replicas=2)  # a change only the standby can serve now
    wait_for(lambda: standby.gauge("npuswarm_leader") == 1, "the standby to take over",
             timeout=TAKEOVER_DEADLINE)
    took_over = time.monotonic() - killed
    wait_md(cluster, namespace, "ha", ready_with(2), "the change served by the new leader", timeout=90)
    served = time.monotonic() - killed
    assert standby.wrote() >= 1
    assert sorted(owned_services(cluster, namespace)) == [f"{namespace}-ha-0", f"{namespace}-ha-1"]
    found = invariants.violations(cluster.docker, lambda: deployments(cluster), INSTANCE)
    assert not found, "\n".join(found)
    print(f"\ntakeover: leader gauge after {took_over:.1f} s, change Ready after {served:.1f} s "
          f"(lifetime {LIFETIME} s)")


def test_a_leader_cut_off_from_the_api_server_stops_writing_before_the_standby_leads(
    cluster: Cluster, namespace: str, peers: list[Peer], api_relay: FaultProxy
) -> None:
    """Issue 25, item 1: the leader loses the API server but not Swarm. Before the lease, it
    kept its last verdict and went on serving its stale index beside the new leader: with
    ``replicas: 2`` applied meanwhile, the old one removed what the new one created."""
    leader, standby = peers
    wait_for(lambda: leader.gauge("npuswarm_leader") == 1, "the higher priority to lead", timeout=60)
    wait_for(lambda: standby.gauge("npuswarm_leader") == 0, "the lower priority to stand by", timeout=30)
    apply(cluster, namespace, "cut")
    wait_md(cluster, namespace, "cut", ready_with(1), "Ready, served by the leader")

    api_relay.stop()  # the leader's API server is gone; Docker is not
    cut = time.monotonic()
    apply(cluster, namespace, "cut", replicas=2)  # only the standby can see this
    wait_for(lambda: leader.gauge("npuswarm_leader") == 0, "the cut-off leader to stop leading",
             timeout=LIFETIME + LEADERSHIP_POLL + 5)
    stopped = time.monotonic() - cut
    # It stopped before the standby could lead: the standby still stands by.
    assert standby.gauge("npuswarm_leader") == 0, "both led at once"
    wait_for(lambda: standby.gauge("npuswarm_leader") == 1, "the standby to take over",
             timeout=TAKEOVER_DEADLINE)
    took_over = time.monotonic() - cut
    wait_md(cluster, namespace, "cut", ready_with(2), "the change served by the new leader",
            timeout=90)
    assert leader.gauge("npuswarm_leader") == 0
    assert sorted(owned_services(cluster, namespace)) == [f"{namespace}-cut-0", f"{namespace}-cut-1"]
    found = invariants.violations(cluster.docker, lambda: deployments(cluster), INSTANCE)
    assert not found, "\n".join(found)
    print(f"\ncut off: the old leader stopped after {stopped:.1f} s, the standby led after "
          f"{took_over:.1f} s (lifetime {LIFETIME} s, hold {HOLD:g} s)")
