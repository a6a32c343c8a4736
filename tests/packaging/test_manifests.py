"""What `kubectl apply -k manifests/...` would install, checked from kustomize's output."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml
from docker.utils import kwargs_from_env

from npuswarm.cli import build_parser
from npuswarm.settings import Settings

from .conftest import MANIFESTS, REPO, of_kind, only

NAMESPACE = "npuswarm-system"
UID = 10001
POD_LABELS = {"app.kubernetes.io/name": "npuswarm", "app.kubernetes.io/component": "operator"}
CRD_FILE = "modeldeployments.npuswarm.io.yaml"
CRD_FILES = [CRD_FILE, "modelgateways.npuswarm.io.yaml"]
INSTALLS = ["manifests", "manifests/base", "manifests/overlays/production"]
CLUSTER_SCOPED = {
    "Namespace",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "ClusterKopfPeering",
}
# Verbs that change something: each one granted must be listed here with its reason.
WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection", "escalate", "bind"}


def kustomization_roots() -> list[str]:
    """Every folder `kubectl apply -k` can be pointed at (components cannot)."""
    roots = []
    for path in sorted(MANIFESTS.rglob("kustomization.yaml")):
        if yaml.safe_load(path.read_text()).get("kind", "Kustomization") == "Kustomization":
            roots.append(str(path.parent.relative_to(REPO)))
    return roots


def rules(objects: list[dict[str, Any]]) -> set[tuple[str, str, str, tuple[str, ...]]]:
    """(apiGroup, resource, verb, resourceNames) for every grant of every (Cluster)Role."""
    found = set()
    for role in of_kind(objects, "ClusterRole") + of_kind(objects, "Role"):
        for rule in role.get("rules", []):
            for group in rule.get("apiGroups", []):
                for resource in rule.get("resources", []):
                    for verb in rule.get("verbs", []):
                        found.add((group, resource, verb, tuple(rule.get("resourceNames", []))))
    return found


def operator_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers = only(objects, "Deployment", "npuswarm")["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "operator")


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p["name"] == port)


# --- rendering ---------------------------------------------------------------------------


def test_every_kustomization_is_covered() -> None:
    # A new overlay must be added to INSTALLS (and so to the security checks below).
    expected = set(INSTALLS) | {"manifests/crd", "manifests/overlays/with-monitoring"}
    found = set(kustomization_roots()) - {"manifests/monitoring"}
    assert found == expected


@pytest.mark.parametrize("root", kustomization_roots())
def test_kustomization_renders(render: Any, root: str) -> None:
    objects = render(root)
    assert objects
    names = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects]
    assert len(names) == len(set(names)), "an object is rendered twice"


def test_manifests_root_installs_exactly_the_base(render: Any) -> None:
    assert render("manifests") == render("manifests/base")


def test_base_installs_these_objects_and_nothing_else(render: Any) -> None:
    found = {(o["kind"], o["metadata"]["name"]) for o in render("manifests")}
    assert found == {
        ("Namespace", NAMESPACE),
        ("CustomResourceDefinition", "modeldeployments.npuswarm.io"),
        ("CustomResourceDefinition", "modelgateways.npuswarm.io"),
        ("ServiceAccount", "npuswarm"),
        ("ClusterRole", "npuswarm"),
        ("ClusterRoleBinding", "npuswarm"),
        # create the root key Secret in its namespace, get that one (NPUSWARM_ROOT_KEY empty)
        ("Role", "npuswarm-root-key"),
        ("RoleBinding", "npuswarm-root-key"),
        ("Deployment", "npuswarm"),
        ("Service", "npuswarm-metrics"),
        ("NetworkPolicy", "npuswarm"),
    }


@pytest.mark.parametrize("root", INSTALLS)
def test_namespaced_objects_live_in_npuswarm_system(render: Any, root: str) -> None:
    for obj in render(root):
        if obj["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in obj["metadata"], obj["metadata"]["name"]
        else:
            assert obj["metadata"].get("namespace") == NAMESPACE, (obj["kind"], obj["metadata"])


# --- CRD ---------------------------------------------------------------------------------


@pytest.mark.parametrize("crd_file", CRD_FILES)
def test_crd_copy_is_byte_identical_to_crds(crd_file: str) -> None:
    copy = (MANIFESTS / "crd" / crd_file).read_bytes()
    source = (REPO / "crds" / crd_file).read_bytes()
    assert copy == source, f"run: cp crds/{crd_file} manifests/crd/{crd_file}"


@pytest.mark.parametrize("crd_file", CRD_FILES)
def test_rendered_crd_differs_from_crds_only_by_argocd_protection(
    render: Any, crd_file: str
) -> None:
    rendered = only(render("manifests"), "CustomResourceDefinition", crd_file[: -len(".yaml")])
    source = yaml.safe_load((REPO / "crds" / crd_file).read_text())
    annotations = rendered["metadata"]["annotations"]
    options = {o.strip() for o in annotations.pop("argocd.argoproj.io/sync-options").split(",")}
    assert options == {"Prune=false", "Delete=false"}
    assert rendered == source


def test_sync_waves_put_namespace_then_crds_before_everything_else(render: Any) -> None:
    def wave(obj: dict[str, Any]) -> int:
        annotations = obj["metadata"].get("annotations") or {}
        return int(annotations.get("argocd.argoproj.io/sync-wave", "0"))

    for root in INSTALLS:
        objects = render(root)
        namespace = wave(only(objects, "Namespace"))
        crds = [wave(o) for o in of_kind(objects, "CustomResourceDefinition")]
        custom = [wave(o) for o in objects if o["kind"] == "ClusterKopfPeering"]
        rest = [
            wave(o)
            for o in objects
            if o["kind"] not in {"Namespace", "CustomResourceDefinition", "ClusterKopfPeering"}
        ]
        assert namespace < min(crds)
        assert all(max(crds) < w for w in custom + rest), root
        # A ModelDeployment in the same Application has the default wave 0: after the CRD.
        assert max(crds) < 0


# --- RBAC --------------------------------------------------------------------------------


@pytest.mark.parametrize("root", INSTALLS)
def test_no_rbac_wildcards(render: Any, root: str) -> None:
    for role in of_kind(render(root), "ClusterRole") + of_kind(render(root), "Role"):
        for rule in role["rules"]:
            assert "nonResourceURLs" not in rule
            for key in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert not any("*" in item for item in rule.get(key, [])), (role, rule)


def test_base_rbac_is_exactly_what_kopf_and_npuswarm_use(render: Any) -> None:
    assert rules(render("manifests")) == {
        ("npuswarm.io", "modeldeployments", "get", ()),
        ("npuswarm.io", "modeldeployments", "list", ()),
        ("npuswarm.io", "modeldeployments", "watch", ()),
        # finalizer and kopf's annotations: merge-patch and JSON-patch, never PUT
        ("npuswarm.io", "modeldeployments", "patch", ()),
        ("npuswarm.io", "modeldeployments/status", "get", ()),
        ("npuswarm.io", "modeldeployments/status", "patch", ()),
        ("npuswarm.io", "modelgateways", "get", ()),
        ("npuswarm.io", "modelgateways", "list", ()),
        ("npuswarm.io", "modelgateways", "watch", ()),
        ("npuswarm.io", "modelgateways", "patch", ()),
        ("npuswarm.io", "modelgateways/status", "get", ()),
        ("npuswarm.io", "modelgateways/status", "patch", ()),
        # kopf.event() POSTs core/v1 Events
        ("", "events", "create", ()),
        # a ModelGateway's API keys Secret, read by name (never listed)
        ("", "secrets", "get", ()),
        # the root key Secret (NPUSWARM_ROOT_KEY empty), a Role of npuswarm-system only:
        # created once (create cannot be narrowed by name), then read by its name
        ("", "secrets", "create", ()),
        ("", "secrets", "get", ("npuswarm-root-key",)),
        # the NPU quota annotation an admin sets on a Namespace (read only, docs/priority.md)
        ("", "namespaces", "get", ()),
        ("", "namespaces", "list", ()),
        ("", "namespaces", "watch", ()),
        ("apiextensions.k8s.io", "customresourcedefinitions", "get", ()),
        ("apiextensions.k8s.io", "customresourcedefinitions", "list", ()),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch", ()),
    }


def test_production_adds_only_peering_on_its_own_object(render: Any) -> None:
    added = rules(render("manifests/overlays/production")) - rules(render("manifests"))
    assert added == {
        ("kopf.dev", "clusterkopfpeerings", "list", ()),
        ("kopf.dev", "clusterkopfpeerings", "watch", ()),
        ("kopf.dev", "clusterkopfpeerings", "get", ("npuswarm",)),
        ("kopf.dev", "clusterkopfpeerings", "patch", ("npuswarm",)),
        # `npuswarm run --peering-name` creates the object (RBAC cannot narrow create by name)
        ("kopf.dev", "clusterkopfpeerings", "create", ()),
    }


@pytest.mark.parametrize("root", INSTALLS)
def test_one_apply_installs_it_no_object_of_a_kind_defined_in_the_same_apply(
    render: Any, root: str
) -> None:
    """kubectl cannot map a kind whose CRD it creates in the same run: such an object would
    need a second `kubectl apply -k`. tests/e2e/test_install.py applies it for real."""
    objects = render(root)
    defined = {
        (c["spec"]["group"], c["spec"]["names"]["kind"])
        for c in of_kind(objects, "CustomResourceDefinition")
    }
    for obj in objects:
        group = obj["apiVersion"].rpartition("/")[0]
        assert (group, obj["kind"]) not in defined, (root, obj["kind"], obj["metadata"]["name"])


@pytest.mark.parametrize("root", INSTALLS)
def test_no_access_to_secrets_and_no_update(render: Any, root: str) -> None:
    """Secrets: `get` (a ModelGateway's API keys Secret, read by name) and, in the operator's
    own namespace only, `create` (its root key Secret); never list, watch, update or delete."""
    objects = render(root)
    for role in of_kind(objects, "ClusterRole"):
        for group, resource, verb, _ in rules([role]):
            assert resource != "secrets" or verb == "get", verb
    for role in of_kind(objects, "Role"):
        assert role["metadata"]["namespace"] == NAMESPACE
    for group, resource, verb, _ in rules(objects):
        assert resource != "secrets" or verb in ("get", "create"), verb
        # kopf only PATCHes; an `update` grant would be unused power.
        assert verb != "update", (group, resource)
        if verb in WRITE_VERBS:
            assert (resource, verb) in {
                ("modeldeployments", "patch"),
                ("modeldeployments/status", "patch"),
                ("modelgateways", "patch"),
                ("modelgateways/status", "patch"),
                ("events", "create"),
                ("secrets", "create"),
                ("clusterkopfpeerings", "patch"),
                # npuswarm run creates its own peering object (one-pass install)
                ("clusterkopfpeerings", "create"),
            }


@pytest.mark.parametrize("root", INSTALLS)
def test_bindings_grant_the_roles_to_the_operator_only(render: Any, root: str) -> None:
    objects = render(root)
    roles = {o["metadata"]["name"] for o in of_kind(objects, "ClusterRole") + of_kind(objects, "Role")}
    bindings = of_kind(objects, "ClusterRoleBinding") + of_kind(objects, "RoleBinding")
    assert bindings
    for binding in bindings:
        assert binding["roleRef"]["name"] in roles
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "npuswarm", "namespace": NAMESPACE}
        ]
    deployment = only(objects, "Deployment", "npuswarm")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "npuswarm"


# --- the operator Deployment ---------------------------------------------------------------


@pytest.mark.parametrize("root", INSTALLS)
def test_every_container_is_locked_down(render: Any, root: str) -> None:
    for deployment in of_kind(render(root), "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        pod_context = pod.get("securityContext", {})
        assert pod_context.get("runAsNonRoot") is True
        assert pod.get("hostNetwork") is not True and pod.get("hostPID") is not True
        for container in pod["containers"] + pod.get("initContainers", []):
            context = container["securityContext"]
            where = f"{root}: {container['name']}"
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["runAsNonRoot"] is True, where
            assert context["runAsUser"] == UID, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            assert context.get("privileged") is not True, where
            seccomp = context.get("seccompProfile") or pod_context.get("seccompProfile")
            assert seccomp == {"type": "RuntimeDefault"}, where
            for kind in ("requests", "limits"):
                assert set(container["resources"][kind]) >= {"cpu", "memory"}, where


@pytest.mark.parametrize("root", INSTALLS)
def test_tmp_is_a_writable_empty_dir(render: Any, root: str) -> None:
    pod = only(render(root), "Deployment", "npuswarm")["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in operator_container(render(root))["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_base_runs_one_standalone_operator(render: Any) -> None:
    objects = render("manifests")
    deployment = only(objects, "Deployment", "npuswarm")
    container = operator_container(objects)
    assert deployment["spec"]["replicas"] == 1
    # Without peering nothing stops an old and a new pod from both writing to Swarm.
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert container["image"] == "npuswarm:0.1.0"
    assert "command" not in container, "the image's entrypoint is npuswarm"
    assert container["args"][0] == "run"
    assert "--liveness=http://0.0.0.0:8080/healthz" in container["args"]
    assert "--standalone" in container["args"]
    build_parser().parse_args(container["args"])  # every flag is one `npuswarm run` knows


def test_liveness_probe_hits_kopfs_endpoint(render: Any) -> None:
    container = operator_container(render("manifests"))
    probe = container["livenessProbe"]
    assert probe["httpGet"]["path"] == "/healthz"
    assert port_number(container, probe["httpGet"]["port"]) == 8080
    # A Swarm outage must not restart the operator: /healthz reports the background probe's
    # last answer without waiting on Docker, so a short timeout is safe.
    assert probe["timeoutSeconds"] < Settings.model_fields["docker_timeout_seconds"].default
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 60
    # install.md says what the manifest does (it once told of a 45 s timeout and a ping).
    install = " ".join((REPO / "docs" / "install.md").read_text().split())
    said = (
        f"every {probe['periodSeconds']} s with a {probe['timeoutSeconds']} s timeout, "
        f"{probe['failureThreshold']} failures in a row"
    )
    assert said in install


def test_service_links_cannot_shadow_npuswarm_settings(render: Any) -> None:
    # The Service npuswarm-metrics would inject NPUSWARM_METRICS_PORT=tcp://<ip>:8081.
    for root in INSTALLS:
        pod = only(render(root), "Deployment", "npuswarm")["spec"]["template"]["spec"]
        assert pod["enableServiceLinks"] is False


def test_docker_connection_comes_from_the_secret_as_docker_py_reads_it(
    render: Any, tmp_path: Path
) -> None:
    objects = render("manifests")
    container = operator_container(objects)
    pod = only(objects, "Deployment", "npuswarm")["spec"]["template"]["spec"]
    env = {e["name"]: e for e in container["env"]}
    assert env["DOCKER_HOST"]["valueFrom"]["secretKeyRef"] == {
        "name": "npuswarm-docker",
        "key": "DOCKER_HOST",
    }
    assert env["DOCKER_TLS_VERIFY"]["value"] == "1"
    cert_path = env["DOCKER_CERT_PATH"]["value"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == cert_path)
    assert mount["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "npuswarm-docker"
    files = sorted(item["path"] for item in volume["secret"]["items"])
    assert files == ["ca.pem", "cert.pem", "key.pem"]
    # Owner and group may read the key, nobody else.
    assert volume["secret"]["defaultMode"] == 0o440
    assert pod["securityContext"]["fsGroup"] == UID

    # docker-py accepts exactly this environment for a TLS connection to a remote manager.
    for name in files:
        (tmp_path / name).write_text("placeholder")
    kwargs = kwargs_from_env(
        environment={
            "DOCKER_HOST": "tcp://swarm-manager.example:2376",
            "DOCKER_TLS_VERIFY": env["DOCKER_TLS_VERIFY"]["value"],
            "DOCKER_CERT_PATH": str(tmp_path),
        }
    )
    # A fixed API version: the client is built without contacting any daemon.
    client = docker.APIClient(version="1.41", **kwargs)
    assert client.base_url == "https://swarm-manager.example:2376"
    assert kwargs["tls"].verify is True
    assert kwargs["tls"].ca_cert == str(tmp_path / "ca.pem")
    assert kwargs["tls"].cert == (str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))


def test_metrics_service_reaches_the_metrics_port(render: Any) -> None:
    for root in INSTALLS:
        objects = render(root)
        service = only(objects, "Service", "npuswarm-metrics")
        container = operator_container(objects)
        pod_labels = only(objects, "Deployment", "npuswarm")["spec"]["template"]["metadata"][
            "labels"
        ]
        assert service["spec"]["selector"] == POD_LABELS
        assert POD_LABELS.items() <= pod_labels.items()
        (port,) = service["spec"]["ports"]
        assert port["name"] == "metrics" and port["port"] == 8081
        metrics_port = port_number(container, port["targetPort"])
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert metrics_port == int(env["NPUSWARM_METRICS_PORT"]) == Settings.model_fields["metrics_port"].default


@pytest.mark.parametrize("root", INSTALLS)
def test_only_prometheus_reaches_the_operator_and_only_its_metrics_port(
    render: Any, root: str
) -> None:
    objects = render(root)
    policy = only(objects, "NetworkPolicy", "npuswarm")["spec"]
    assert policy["podSelector"] == {"matchLabels": POD_LABELS}
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    assert rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    (source,) = rule["from"]
    assert source["namespaceSelector"]["matchLabels"] and source["podSelector"]["matchLabels"]
    # The named port is the one the metrics Service targets.
    container = operator_container(objects)
    assert port_number(container, "metrics") == Settings.model_fields["metrics_port"].default


def test_image_can_be_replaced_with_kustomize_images(kubectl: str, tmp_path: Path) -> None:
    base = os.path.relpath(MANIFESTS / "base", tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [base],
                "images": [
                    {
                        "name": "npuswarm",
                        "newName": "registry.example.com/ai/npuswarm",
                        "newTag": "0.2.0",
                    }
                ],
            }
        )
    )
    result = subprocess.run(
        [kubectl, "kustomize", "--load-restrictor=LoadRestrictionsNone", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    objects = [o for o in yaml.safe_load_all(result.stdout) if o]
    container = operator_container(objects)
    assert container["image"] == "registry.example.com/ai/npuswarm:0.2.0"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NPUSWARM_AGENT_IMAGE"] == container["image"], "the node agents follow the edit"


# --- production: peering -------------------------------------------------------------------


def production_command(render: Any) -> tuple[list[str], str]:
    container = operator_container(render("manifests/overlays/production"))
    assert container["command"] == ["/bin/sh", "-c"]
    (script,) = container["args"]
    return container["command"], script


def test_production_runs_two_peered_replicas(render: Any) -> None:
    objects = render("manifests/overlays/production")
    deployment = only(objects, "Deployment", "npuswarm")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    _, script = production_command(render)
    assert "--standalone" not in script
    pdb = only(objects, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == POD_LABELS


def test_production_runs_the_base_arguments_plus_peering(render: Any) -> None:
    base_args = operator_container(render("manifests"))["args"]
    _, script = production_command(render)
    exec_line = next(line for line in script.splitlines() if line.startswith("exec "))
    argv = shlex.split(exec_line)[1:]
    assert argv[0] == "npuswarm"
    assert sorted(a for a in argv[1:] if not a.startswith("--priority=")) == sorted(
        [a for a in base_args if a != "--standalone"] + ["--peering-name=npuswarm"]
    )
    # --peering-name makes peering mandatory; npuswarm run creates the object, the one name
    # the peering role may read and patch.
    parsed = build_parser().parse_args(
        [a.replace("$priority", "1") for a in argv[1:]]  # a number once the shell ran
    )
    assert ("kopf.dev", "clusterkopfpeerings", "patch", (parsed.peering_name,)) in rules(
        render("manifests/overlays/production")
    )
    assert not parsed.standalone


def test_peering_crd_matches_how_kopf_uses_it(render: Any) -> None:
    crd = only(
        render("manifests/overlays/production"),
        "CustomResourceDefinition",
        "clusterkopfpeerings.kopf.dev",
    )
    assert crd["spec"]["scope"] == "Cluster"
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1"
    # kopf patches status through the main resource unless a status subresource exists; the
    # RBAC above grants no clusterkopfpeerings/status.
    assert "subresources" not in version
    schema = version["schema"]["openAPIV3Schema"]
    assert schema["properties"]["status"]["x-kubernetes-preserve-unknown-fields"] is True
    options = crd["metadata"]["annotations"]["argocd.argoproj.io/sync-options"]
    assert {"Prune=false", "Delete=false"} <= set(options.split(","))


def run_priority_script(render: Any, tmp_path: Path, pod_ip: str | None) -> tuple[int, str]:
    command, script = production_command(render)
    fake = tmp_path / "npuswarm"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}"}
    if pod_ip is not None:
        env["POD_IP"] = pod_ip
    result = subprocess.run(
        [*command, script], check=False, env=env, capture_output=True, text=True, timeout=30
    )
    priority = next(
        (a.split("=", 1)[1] for a in result.stdout.split() if a.startswith("--priority=")), ""
    )
    return result.returncode, priority


def test_each_replica_gets_its_own_priority(render: Any, tmp_path: Path) -> None:
    # kopf pauses ALL instances that see a peer with their own priority.
    priorities = set()
    for ip in ("10.244.1.7", "10.244.2.7", "fd00:10:244:1::7", "fd00:10:244:2::7"):
        code, priority = run_priority_script(render, tmp_path, ip)
        assert code == 0
        assert int(priority) >= 0
        priorities.add(priority)
    assert len(priorities) == 4


def test_no_pod_ip_means_no_start(render: Any, tmp_path: Path) -> None:
    code, priority = run_priority_script(render, tmp_path, None)
    assert code != 0 and priority == ""


def test_production_sets_pod_ip_from_the_downward_api(render: Any) -> None:
    container = operator_container(render("manifests/overlays/production"))
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"


# --- monitoring (another engineer's folder, included by overlays/with-monitoring) ----------


def test_with_monitoring_scrapes_the_metrics_service(render: Any) -> None:
    objects = render("manifests/overlays/with-monitoring")
    service = only(objects, "Service", "npuswarm-metrics")
    monitors = of_kind(objects, "ServiceMonitor")
    assert monitors and of_kind(objects, "PrometheusRule")
    for monitor in monitors:
        selector = monitor["spec"]["selector"]["matchLabels"]
        assert selector.items() <= service["metadata"]["labels"].items()
        assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"metrics"}
        namespaces = monitor["spec"].get("namespaceSelector", {}).get("matchNames")
        assert monitor["metadata"].get("namespace") == NAMESPACE or namespaces == [NAMESPACE]


def test_every_npuswarm_setting_in_the_deployment_is_valid(
    render: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    for root in INSTALLS:
        container = operator_container(render(root))
        values = {
            e["name"]: e["value"]
            for e in container["env"]
            if e["name"].startswith("NPUSWARM_") and "value" in e  # not those from a Secret
        }
        assert "NPUSWARM_ALLOWED_HOST_PATHS" in values
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        settings = Settings.from_env()  # exits with the bad variable's name otherwise
        assert settings.allowed_host_paths == ("/models", "/data")
