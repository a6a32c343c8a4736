"""ModelGateways in a pass: selection, backends that follow placement, the gateway's service,
its status, and the order of pushes and writes (a replica leaves the gateways first)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from npuswarm import metrics
from npuswarm.api import labels
from npuswarm.api.deployment import ModelDeployment
from npuswarm.api.gateway import ModelGateway
from npuswarm.gateway.backends import GatewayReplica, GatewayWork, desired_backends, gateway_status, parse_gateways, running_replicas, selected, stopped_by
from npuswarm.gateway.service import SecretMount, gateway_actions, render_gateway
from npuswarm.gateway.credentials import Credentials
from npuswarm.gateway.push import Gateways, PushTarget
from npuswarm.core.diff import Action
from npuswarm.reconcile import Reconciler
from npuswarm.core.pipeline import Desired
from npuswarm.settings import Settings

from .builders import NOW, deployment
from .memswarm import MemorySwarm

NET = {"name": "vllm-net", "alias": None}
ROOT = "unit-test-root-key-0123456789"
CREDENTIALS = Credentials(ROOT, "default")
MOUNTS = (SecretMount("key-secret", "npuswarm-gateway-credential", "sid1"),
          SecretMount("tls-secret", "npuswarm-gateway-tls.pem", "sid2"))


def gateway(name: str = "gw", namespace: str = "default", uid: str = "", **spec: Any) -> ModelGateway:
    body: dict[str, Any] = {"network": {"name": "vllm-net"}}
    body.update(spec)
    metadata = {"name": name, "namespace": namespace, "generation": 3, "uid": uid}
    return ModelGateway.model_validate({"metadata": metadata, "spec": body})


def model(name: str, replicas: int = 1, **extra: Any) -> ModelDeployment:
    return deployment(
        name,
        replicas=replicas,
        servedModelName=f"served-{name}",
        network={"name": "vllm-net"},
        updateStrategy={"maxUnavailable": 1},
        **extra,
    )


# --- the API -------------------------------------------------------------------------------


def test_gateway_defaults_and_refusals() -> None:
    gw = gateway()
    assert (gw.spec.port, gw.spec.adminPort, gw.spec.replicas, gw.spec.policy) == (
        8000,
        8079,
        1,
        "cache_aware",
    )
    assert gw.spec.publish.mode == "host"
    assert gateway(nodeSelector={"pool.gpu_class-1": "a"}).spec.nodeSelector
    for bad in ({"adminPort": 8000}, {"policy": "fastest"}, {"replicas": -1}, {"prot": 1},
                # Swarm refuses a '/' in a constraint's label key.
                {"nodeSelector": {"example.com/pool": "a"}}):
        with pytest.raises(ValidationError):
            gateway(**bad)
    with pytest.raises(ValidationError):
        ModelGateway.model_validate({"metadata": {"name": "x"}, "spec": {}})  # network required


# --- selection and backends ------------------------------------------------------------------


def test_selects_its_namespace_labels_and_network_only() -> None:
    labelled = deployment("a", network=NET)
    labelled.metadata.labels = {"tier": "chat"}
    other_ns = deployment("b", namespace="other", network=NET)
    other_net = deployment("c", network={"name": "elsewhere"})
    no_net = deployment("d")
    plain = deployment("e", network=NET)
    everything = [labelled, other_ns, other_net, no_net, plain]
    assert [md.metadata.name for md in selected(gateway(), everything)] == ["a", "e"]
    chat = gateway(modelSelector={"matchLabels": {"tier": "chat"}})
    assert [md.metadata.name for md in selected(chat, everything)] == ["a"]


def overlay_swarm(nodes: int) -> MemorySwarm:
    swarm = MemorySwarm(nodes=nodes)
    swarm.networks[0]["Scope"] = "swarm"  # vllm-net is an overlay npuswarm made for "default"
    swarm.networks[0]["Labels"] = {labels.MANAGED_BY: labels.MANAGED_BY_VALUE,
                                   labels.NETWORK_NAMESPACE: "default"}
    return swarm


def placed(swarm: MemorySwarm, deployments: list[ModelDeployment]) -> Reconciler:
    """One pass places and creates them; then every task runs, each with an overlay IP."""
    r = Reconciler(swarm, Settings(), clock=lambda: NOW)
    r.run_pass(Desired(deployments=deployments))
    run_with_addresses(swarm)
    return r


def run_with_addresses(swarm: MemorySwarm) -> None:
    swarm.run_all()
    for index, task in enumerate(swarm.tasks, start=1):
        task["NetworksAttachments"] = [
            {"Network": {"Spec": {"Name": "vllm-net"}}, "Addresses": [f"10.0.1.{index}/24"]}
        ]


def test_backends_are_ready_replicas_task_ips_minus_those_being_stopped() -> None:
    swarm = overlay_swarm(nodes=2)
    a, b = model("a", replicas=2, engine={"port": 8001}), model("b")
    placed(swarm, [a, b])
    snapshot = swarm.observe()
    backends = desired_backends(gateway(), [a, b], snapshot, frozenset())
    assert set(backends) == {"served-a", "served-b"}
    assert len(backends["served-a"]) == 2 and all(
        u.startswith("http://10.0.1.") and u.endswith(":8001") for u in backends["served-a"]
    )
    first = snapshot.services_of(a.key)[0]
    stopping = desired_backends(gateway(), [a, b], snapshot, frozenset({first.name}))
    assert len(stopping["served-a"]) == 1 and stopping["served-b"] == backends["served-b"]


def test_a_model_without_a_ready_replica_is_listed_with_no_backend() -> None:
    swarm = overlay_swarm(nodes=1)
    a = model("a")
    Reconciler(swarm, Settings(), clock=lambda: NOW).run_pass(Desired(deployments=[a]))
    swarm.run_all(state="starting")  # not healthy yet
    assert desired_backends(gateway(), [a], swarm.observe(), frozenset()) == {"served-a": []}


def test_removals_and_updates_stop_a_replica_creates_do_not() -> None:
    actions = [
        Action("create", "0", "s-new", "new replica"),
        Action("update", "1", "s-upd", "spec changed"),
        Action("remove", "2", "s-rm", "replica no longer wanted"),
    ]
    assert stopped_by(actions) == {"s-upd", "s-rm"}


# --- the gateway's own service ---------------------------------------------------------------


def test_rendered_gateway_service() -> None:
    spec = render_gateway(gateway(replicas=3, policy="power_of_two"), "default", MOUNTS)
    template = spec["TaskTemplate"]
    assert spec["Mode"] == {"Replicated": {"Replicas": 3}}
    assert template["Placement"]["MaxReplicas"] == 1  # replicas on different nodes
    assert template["Networks"] == [{"Target": "vllm-net"}]
    assert "GenericResources" not in str(spec) and "ASCEND" not in str(spec)  # no NPUs
    container = template["ContainerSpec"]
    assert "Env" not in container  # no credential in the environment
    assert [(m["SecretName"], m["SecretID"], m["File"]["Mode"]) for m in container["Secrets"]] == [
        ("key-secret", "sid1", 0o400), ("tls-secret", "sid2", 0o400)
    ]
    assert container["Args"][container["Args"].index("--policy") + 1] == "power_of_two"
    ports = spec["EndpointSpec"]["Ports"]
    assert [(p["PublishedPort"], p["PublishMode"]) for p in ports] == [(8000, "host"), (8079, "host")]
    assert spec["EndpointSpec"]["Mode"] == "dnsrr"  # host mode: works without IPVS
    assert spec["Labels"][labels.GATEWAY_NAME] == "gw"
    assert labels.OWNER_NAME not in spec["Labels"]  # no replica of any deployment
    ingress = render_gateway(gateway(publish={"mode": "ingress"}), "default", MOUNTS)
    assert ingress["EndpointSpec"]["Mode"] == "vip"  # the routing mesh needs a VIP
    assert [p["PublishMode"] for p in ingress["EndpointSpec"]["Ports"]] == ["ingress", "host"]


def test_gateway_services_are_created_then_left_alone_then_updated_on_change() -> None:
    swarm = overlay_swarm(nodes=1)
    gw = gateway()
    mounts = {gw.key: MOUNTS}
    (create,) = gateway_actions([gw], swarm.observe(), "default", mounts)
    assert create.kind == "create"
    swarm.create_service(create.spec or {})
    snapshot = swarm.observe()
    assert snapshot.services == []  # not taken for a deployment's replica (nor an orphan)
    assert [s.name for s in snapshot.gateway_services] == ["default-gw-gateway"]
    assert gateway_actions([gw], snapshot, "default", mounts) == []
    (update,) = gateway_actions([gateway(replicas=2)], snapshot, "default", mounts)
    assert update.kind == "update" and update.service_name == "default-gw-gateway"


def test_status_ready_degraded_and_endpoint() -> None:
    replica = GatewayReplica("host1", "10.0.0.1", 8079, "10.0.0.1:8000")
    work = GatewayWork(gateway(), {"served-a": ["http://10.0.1.1:8001"]}, [replica])
    status = gateway_status(work, {"served-a": "default/a"}, [], NOW)
    assert (status.phase, status.readyReplicas, status.endpoint) == ("Ready", 1, "10.0.0.1:8000")
    assert status.models[0].backends == ["http://10.0.1.1:8001"]
    kinds = {c.type: c.status for c in status.conditions}
    assert kinds == {
        "Ready": "True",
        "Progressing": "False",
        "Degraded": "False",
        "Reconciling": "False",
        "Stalled": "False",
    }
    idle = GatewayWork(gateway(), {"served-a": []}, [replica])
    degraded = gateway_status(idle, {"served-a": "default/a"}, [], NOW)
    assert degraded.phase == "Degraded"
    assert {c.type: c.reason for c in degraded.conditions}["Degraded"] == "ModelWithoutBackend"
    failed = GatewayWork(gateway(), {"served-a": ["http://x:1"]}, [replica], {replica.admin_url: "401"})
    assert {c.type: c.reason for c in gateway_status(failed, {}, [], NOW).conditions}["Ready"] == (
        "PushFailed"
    )


def test_parse_gateways_skips_deleting_ones_and_keeps_previous_status() -> None:
    raw = {"metadata": {"name": "gw", "namespace": "ns"}, "spec": {"network": {"name": "n"}}}
    gone = {"metadata": {"name": "old", "namespace": "ns", "deletionTimestamp": "x"}, "spec": {}}
    bad = {"metadata": {"name": "bad", "namespace": "ns"}, "spec": {"port": "x"}}
    found, previous = parse_gateways({1: [raw], 2: [gone], 3: [bad]}, {"ns/gw": {"phase": "Ready"}})
    assert [g.key for g in found] == ["ns/gw"]
    assert previous["ns/gw"] == {"phase": "Ready"}


# --- in a pass: push before the writes that stop a replica ---------------------------------


class Recorder:
    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []
        self.targets: list[PushTarget] = []
        self.states: list[dict[str, Any]] = []

    def send(self, target: PushTarget, state: dict[str, Any]) -> None:
        self.targets.append(target)
        self.states.append(state)
        self.log.append(("push", {m: len(u) for m, u in state["models"].items()}))


def test_a_replica_leaves_every_gateway_before_its_task_is_stopped() -> None:
    swarm = overlay_swarm(nodes=2)
    swarm.nodes[0]["Status"]["Addr"] = "10.123.0.1"
    recorder = Recorder()
    updates = swarm.update_service

    def recorded_update(service_id: str, version: int, spec: dict[str, Any]) -> None:
        recorder.log.append(("update", spec["Name"]))
        updates(service_id, version, spec)

    swarm.update_service = recorded_update  # type: ignore[method-assign]
    gateways = Gateways("default", CREDENTIALS, send=recorder.send)
    r = Reconciler(swarm, Settings(), clock=lambda: NOW, gateways=gateways)
    a = model("a", replicas=2)
    gw = gateway()
    r.run_pass(Desired(deployments=[a], gateways=[gw]))  # creates replicas and the gateway
    run_with_addresses(swarm)
    (gw_service,) = [s for s in swarm.services.values() if labels.GATEWAY_NAME in s["Spec"]["Labels"]]
    gw_task = {
        "ID": "gw-task",
        "ServiceID": gw_service["ID"],
        "NodeID": "node1",
        "DesiredState": "running",
        "CreatedAt": "2026-11-30T11:00:00Z",
        "Status": {"State": "running", "Timestamp": "2026-11-30T11:00:00Z"},
        "Spec": {"ContainerSpec": {"Labels": {}}},
    }
    swarm.tasks.append(gw_task)
    desired = Desired(deployments=[a], gateways=[gw])
    first = r.run_pass(desired)  # hands the new gateway task its state; does not wait
    assert first.gateways["default/gw"].readyReplicas == 0, "not configured until it accepts"
    settle(gateways)
    assert recorder.log == [("push", {"served-a": 2})]
    ready = r.run_pass(desired)
    assert ready.gateways["default/gw"].phase == "Ready"
    assert ready.gateways["default/gw"].endpoint == "10.123.0.1:8000"

    r.run_pass(desired)
    settle(gateways)
    assert recorder.log == [("push", {"served-a": 2})], "nothing changed: no second push"

    recorder.log.clear()
    changed = Desired(deployments=[model("a", replicas=2, engine={"maxModelLen": 4096})], gateways=[gw])
    held = r.run_pass(changed)
    # maxUnavailable 1: one replica is to be updated; the gateway may still list it, so the
    # update waits for the pass after the gateway accepted a state without it.
    assert not held.views["default/a"].applied and held.views["default/a"].requeue
    assert metrics.REGISTRY.get_sample_value("npuswarm_gateway_held_writes") == 1
    settle(gateways)
    r.run_pass(changed)
    assert recorder.log == [("push", {"served-a": 1}), ("update", "default-a-0")]

    recorder.log.clear()
    swarm.tasks = [t for t in swarm.tasks if t["ID"] != "gw-task"]
    swarm.tasks.append(dict(gw_task, ID="gw-task-2"))  # the gateway restarted: a new task
    r.run_pass(changed)
    settle(gateways)
    assert recorder.log and recorder.log[0][0] == "push", "a new gateway task is refilled"


def settle(gateways: Gateways) -> None:
    assert gateways.pusher is not None and gateways.pusher.settle(10.0), "pushes did not end"


def test_without_a_root_key_gateways_are_not_run_and_say_why() -> None:
    swarm = overlay_swarm(nodes=1)
    recorder = Recorder()
    r = Reconciler(swarm, Settings(), clock=lambda: NOW, gateways=Gateways("default", None, recorder.send))
    result = r.run_pass(Desired(deployments=[model("a")], gateways=[gateway()]))
    assert swarm.observe().gateway_services == [] and recorder.log == [] and swarm.secrets == {}
    status = result.gateways["default/gw"]
    assert {c.type: c.reason for c in status.conditions}["Ready"] == "NotConfigured"


def test_running_replicas_are_reached_at_their_nodes_address() -> None:
    swarm = overlay_swarm(nodes=2)
    swarm.nodes[1]["Status"]["Addr"] = "0.0.0.0"
    swarm.nodes[1]["ManagerStatus"] = {"Addr": "10.123.0.2:2377"}
    gw = gateway(adminPort=9000)
    spec = render_gateway(gw, "default", MOUNTS)
    service_id = swarm.create_service(spec)
    swarm.tasks.append(
        {
            "ID": "t",
            "ServiceID": service_id,
            "NodeID": "node2",
            "DesiredState": "running",
            "CreatedAt": "2026-11-30T11:00:00Z",
            "Status": {"State": "running"},
        }
    )
    (replica,) = running_replicas(gw, swarm.observe())
    assert replica.admin_url == "https://10.123.0.2:9000" and replica.node == "host2"


def test_a_network_a_gateway_still_uses_is_not_removed() -> None:
    swarm = overlay_swarm(nodes=1)
    swarm.networks[0]["Labels"] = {labels.MANAGED_BY: labels.MANAGED_BY_VALUE}  # npuswarm's own
    r = Reconciler(swarm, Settings(), clock=lambda: NOW, gateways=Gateways("default", CREDENTIALS))
    r.run_pass(Desired(deployments=[], gateways=[gateway()]))  # creates the gateway's service
    r.run_pass(Desired(deployments=[], gateways=[gateway()]))  # no deployment wants vllm-net
    assert swarm.calls["remove_network"] == 0
    r.run_pass(Desired(deployments=[]))  # the gateway gone (its finalizer ran)
    r.finalize_gateway("default", "gw")
    r.run_pass(Desired(deployments=[]))
    assert swarm.calls["remove_network"] == 1


def test_a_gateway_image_the_admin_does_not_allow_is_not_run() -> None:
    swarm = overlay_swarm(nodes=1)
    policy = Settings(allowed_images="registry.local/*").tenant_policy()
    r = Reconciler(swarm, Settings(), clock=lambda: NOW,
                   gateways=Gateways("default", CREDENTIALS, Recorder().send, policy=policy))
    result = r.run_pass(Desired(deployments=[model("a")], gateways=[gateway(image="docker.io/evil/gw:1")]))
    assert swarm.observe().gateway_services == []
    status = result.gateways["default/gw"]
    reasons = {c.type: (c.reason, c.message) for c in status.conditions}
    assert reasons["Degraded"][0] == "PolicyViolation" and "not an allowed image" in reasons["Degraded"][1]
    allowed = gateway(image="registry.local/npuswarm-gateway:1")
    r.run_pass(Desired(deployments=[model("a")], gateways=[allowed]))
    assert [s.name for s in swarm.observe().gateway_services] == ["default-gw-gateway"]


class GatewayCatalog:
    """The complete LIST that confirms which ModelGateways exist; None: the read failed."""

    def __init__(self, existing: set[str] | None) -> None:
        self.found = existing
        self.asked: list[tuple[set[str], str]] = []

    def existing(self, owners: set[str], plural: str = "modeldeployments") -> set[str] | None:
        self.asked.append((set(owners), plural))
        return None if self.found is None else owners & self.found


def gateway_reconciler(swarm: MemorySwarm, catalog: GatewayCatalog | None = None) -> Reconciler:
    recorder = Recorder()
    return Reconciler(swarm, Settings(), clock=lambda: NOW, owners=catalog,
                      gateways=Gateways("default", CREDENTIALS, recorder.send))


def test_a_pass_that_read_a_gateway_before_its_deletion_does_not_bring_it_back() -> None:
    """Issue 25, item 2: a pass read its desired state, the gateway's finalizer removed its
    service and secrets meanwhile, then the pass got the lock: it re-created them, and with no
    owner left they ran forever with their credential and published ports."""
    swarm = overlay_swarm(nodes=1)
    r = gateway_reconciler(swarm)
    gw = gateway(uid="uid-gw")
    stale = Desired(deployments=[model("a")], gateways=[gw])
    r.run_pass(stale)
    assert [s.name for s in swarm.observe().gateway_services] == ["default-gw-gateway"]
    r.finalize_gateway("default", "gw", "uid-gw")
    assert swarm.observe().gateway_services == [] and swarm.secrets == {}
    r.run_pass(stale)  # read before the deletion, run after it
    assert swarm.observe().gateway_services == [] and swarm.secrets == {}


def test_gateway_services_whose_gateway_a_complete_list_confirms_gone_are_removed() -> None:
    swarm = overlay_swarm(nodes=1)
    gw, kept = gateway(uid="uid-gw"), gateway("kept", uid="uid-kept")
    r = gateway_reconciler(swarm, GatewayCatalog({"default/kept"}))
    r.run_pass(Desired(deployments=[model("a")], gateways=[gw, kept]))
    assert len(swarm.observe().gateway_services) == 2
    # Deleted while no operator ran its finalizer (or forced): its service is an orphan.
    r.run_pass(Desired(deployments=[model("a")], gateways=[kept]))
    assert [s.name for s in swarm.observe().gateway_services] == ["default-kept-gateway"]
    assert all("default-gw" not in s["Spec"]["Name"] for s in swarm.secrets.values())
    assert r.owners.asked[-1] == ({"default/gw"}, "modelgateways")  # type: ignore[union-attr]


def test_a_gateway_service_is_kept_when_the_list_cannot_confirm_its_gateway_gone() -> None:
    """Right after a start kopf's index may not hold every gateway yet: only a complete read
    of the API server decides, and a failed one removes nothing."""
    swarm = overlay_swarm(nodes=1)
    gw = gateway(uid="uid-gw")
    r = gateway_reconciler(swarm, GatewayCatalog(None))
    r.run_pass(Desired(deployments=[model("a")], gateways=[gw]))
    r.run_pass(Desired(deployments=[model("a")]))
    assert [s.name for s in swarm.observe().gateway_services] == ["default-gw-gateway"]
    r.owners = GatewayCatalog({"default/gw"})
    r.run_pass(Desired(deployments=[model("a")]))
    assert [s.name for s in swarm.observe().gateway_services] == ["default-gw-gateway"]
