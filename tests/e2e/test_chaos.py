"""Issue 12: crash safety and races, judged by the one invariant checker (tests/invariants.py).

The crash test SIGKILLs the operator at a random moment after a random change, restarts it,
waits for convergence and checks the invariants, NPUSWARM_CHAOS_ITERATIONS times (default 6,
fixed seed NPUSWARM_CHAOS_SEED, default 12); it ends with a restart without any change, which
must rewrite no service.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

import pytest
import yaml

from tests import invariants
from tests.e2e.conftest import INSTANCE, Cluster, condition, manifest, wait_md
from tests.helpers import IMAGE, wait_for

pytestmark = pytest.mark.e2e

ITERATIONS = int(os.environ.get("NPUSWARM_CHAOS_ITERATIONS", "6"))
SEED = int(os.environ.get("NPUSWARM_CHAOS_SEED", "12"))
NAMES = ("a", "b", "c")


def deployments(cluster: Cluster, namespace: str | None = None) -> list[dict[str, Any]]:
    scope = ["-n", namespace] if namespace else ["--all-namespaces"]
    out = cluster.kubectl("get", "md", *scope, "-o", "json").stdout
    return list(json.loads(out)["items"])


def owned_services(cluster: Cluster, namespace: str) -> dict[str, dict[str, Any]]:
    return {s["Spec"]["Name"]: s for s in cluster.docker.services(
        filters={"label": [f"npuswarm.io/owner-namespace={namespace}", f"npuswarm.io/instance={INSTANCE}"]})}


def short_of_npus(obj: dict[str, Any]) -> bool:
    """Left out for want of NPUs, and saying so (other sessions share this Swarm's 8 NPUs)."""
    return any(c.get("reason") == "InsufficientNPUs" and c.get("message")
               for c in obj.get("status", {}).get("conditions", []))


def converged(obj: dict[str, Any]) -> bool:
    status = obj.get("status", {})
    if status.get("observedGeneration") != obj["metadata"]["generation"]:
        return False
    return condition(obj, "Ready").get("status") == "True" or short_of_npus(obj)


def check(cluster: Cluster, namespace: str, foreign: dict[str, Any], what: str) -> None:
    # Every deployment of the session: the installation's services of other namespaces are
    # owned too, not orphans.
    found = invariants.violations(cluster.docker, lambda: deployments(cluster), INSTANCE,
                                  foreign_before=foreign)
    assert not found, f"{what}: invariants violated:\n" + "\n".join(found)


def foreign_service(cluster: Cluster, namespace: str) -> dict[str, Any]:
    """Another installation's service on the same Swarm: npuswarm must leave it alone."""
    labels = {"npuswarm.io/managed-by": "npuswarm", "npuswarm.io/instance": f"other-{namespace}",
              "npuswarm.io/owner-namespace": namespace, "npuswarm.io/owner-name": "other",
              "npuswarm.io/owner-uid": "someone-elses", "npuswarm.io/replica": "0"}
    return cluster.docker.create_service({"ContainerSpec": {"Image": IMAGE, "Command": ["sleep", "3600"]}},
                                         name=f"{namespace}-foreign-0", labels=labels)


def apply(cluster: Cluster, namespace: str, name: str, replicas: int, env: str) -> None:
    body = yaml.safe_load(manifest(name, replicas=replicas, npusPerReplica=1))
    body["spec"]["engine"]["env"] = {"CHAOS": env}  # a spec change that rolls, like an image change
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=yaml.safe_dump(body))


def random_change(rng: random.Random, state: dict[str, tuple[int, str]], step: int) -> str:
    absent = [n for n in NAMES if n not in state]
    if absent and (not state or rng.random() < 0.5):
        name = rng.choice(absent)
        state[name] = (rng.randint(1, 2), "0")
        return f"create {name} x{state[name][0]}"
    name = rng.choice(sorted(state))
    replicas, env = state[name]
    if rng.random() < 0.5:
        state[name] = (rng.choice([r for r in (0, 1, 2) if r != replicas]), env)
        return f"scale {name} {replicas}->{state[name][0]}"
    state[name] = (replicas, str(step))
    return f"roll {name} (env CHAOS={step})"


def restart_rewrites_nothing(cluster: Cluster, namespace: str) -> None:
    def fingerprint() -> dict[str, Any]:
        return {n: (s["Spec"], s.get("PreviousSpec"), s.get("UpdateStatus", {}).get("StartedAt"))
                for n, s in owned_services(cluster, namespace).items()}

    before = fingerprint()
    cluster.kill_operator()
    offset = len(cluster.operator_log())
    cluster.start_operator()
    # The first passes after a start may come before the deployments are listed: wait for one
    # that saw them all; it must have written nothing to Swarm.
    wanted = len(deployments(cluster))

    def full_pass() -> dict[str, Any] | None:
        for line in cluster.operator_log()[offset:].splitlines():
            if line.startswith("{") and '"event": "pass"' in line:
                event: dict[str, Any] = json.loads(line)
                if event["deployments"] >= wanted:
                    return event
        return None

    first = wait_for(full_pass, "a pass of the restarted operator over every deployment", timeout=60)
    assert first["writes"] == 0, first
    after = fingerprint()
    assert after == before, f"a restart alone rewrote services: {sorted(n for n in after if after[n] != before.get(n))}"


def test_sigkill_at_random_points_converges_and_keeps_the_invariants(cluster: Cluster, namespace: str) -> None:
    rng = random.Random(SEED)
    other = foreign_service(cluster, namespace)
    try:
        foreign = invariants.foreign_snapshot(cluster.docker, INSTANCE, label=f"npuswarm.io/instance=other-{namespace}")
        state: dict[str, tuple[int, str]] = {}
        started = time.monotonic()
        for step in range(ITERATIONS):
            change = random_change(rng, state, step)
            name = change.split()[1]
            apply(cluster, namespace, name, *state[name])
            time.sleep(rng.uniform(0, 2))  # the kill's random moment, not a synchronisation
            cluster.kill_operator()
            cluster.start_operator()
            for md in state:
                wait_md(cluster, namespace, md, converged, f"converged after kill {step} ({change})", timeout=120)
            check(cluster, namespace, foreign, f"iteration {step} ({change})")
            for md, (replicas, _) in state.items():
                obj = cluster.get(namespace, md)
                if not short_of_npus(obj):
                    assert obj["status"]["placedReplicas"] == replicas, (change, obj["status"])
        restart_rewrites_nothing(cluster, namespace)
        check(cluster, namespace, foreign, "after a restart without change")
        print(f"chaos: seed {SEED}, {ITERATIONS} kills, 0 violations, {time.monotonic() - started:.0f} s")
    finally:
        cluster.docker.remove_service(other["ID"])


def test_twenty_deployments_at_once_share_the_npus_without_overlap(cluster: Cluster, namespace: str) -> None:
    docs = [yaml.safe_load(manifest(f"r{i:02d}", replicas=1, npusPerReplica=1 + i % 2)) for i in range(20)]
    assert sum(d["spec"]["npusPerReplica"] for d in docs) > 8
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=yaml.safe_dump_all(docs))

    def settled() -> list[dict[str, Any]] | None:
        items = deployments(cluster, namespace)
        done = len(items) == 20 and all(
            i.get("status", {}).get("observedGeneration") == i["metadata"]["generation"]
            and (i["status"].get("placedReplicas") == 1 or short_of_npus(i)) for i in items)
        return items if done else None

    items = wait_for(settled, "all 20 placed or told why not", timeout=120, interval=1)
    check(cluster, namespace, {}, "20 at once")
    placed = [i for i in items if i["status"].get("placedReplicas") == 1]
    left_out = [i for i in items if i not in placed]
    assert placed and left_out, (len(placed), len(left_out))
    for i in left_out:
        assert short_of_npus(i), i["status"]
    held = [(r.get("nodeId"), n) for i in placed for r in i["status"]["replicaStatuses"] for n in r["npus"]]
    assert len(held) == len(set(held)), f"placed deployments share NPUs: {held}"
    assert len(held) <= 8
