"""Import: the services of a stack file that run `vllm serve`, as ModelDeployment manifests,
with what was mapped, what was dropped and why. Pure functions over the parsed file."""

from __future__ import annotations

import math
import posixpath
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError

from npuswarm.api import deployment as deployment_api
from npuswarm.api import labels, meta
from npuswarm.api.deployment import ModelDeployment
from npuswarm.api.meta import validation_message
from npuswarm.core.clock import SECOND_NS
from npuswarm.core.hostpolicy import DEFAULT_ALLOWED_HOST_PATHS, host_path_violation
from npuswarm.core.npus import format_npu_ids, npu_id_from_device, parse_npu_ids
from npuswarm.stackfiles.compose import (
    EXTENSION,
    RUNTIME_CONTROL_DEVICES,
    RUNTIME_DRIVER_MOUNTS,
    SHM_PATH,
    SWARM_DEPRECATED,
    SWARM_FORBIDDEN,
    SWARM_RESTART_DELAY_SECONDS,
    SWARM_UNSUPPORTED,
    SWARM_UNSUPPORTED_BEFORE,
    Note,
    Notes,
    StackFileError,
    clean_path,
    command_line,
    dns_label,
    duration_ns,
    quantity,
    ram_bytes,
    scalar,
    unescape,
)
from npuswarm.stackfiles.vllm_args import parse_serve_args, vllm_serve_args

_NODE_LABEL_EQ = re.compile(r"^node\.labels\.([^=!\s]+)\s*==\s*(.+?)\s*$")
_URL = re.compile(r"https?://[^/\s'\"]+(/[^\s'\"?#]*)?")


@dataclass(frozen=True)
class ImportedService:
    service: str  # the compose service (or services, for an exported deployment)
    deployment: ModelDeployment
    manifest: dict[str, Any]  # what is written: only the fields the stack file set
    notes: tuple[Note, ...]

    @property
    def name(self) -> str:
        return self.deployment.metadata.name


@dataclass(frozen=True)
class StackImport:
    services: list[ImportedService]
    skipped: list[Note]


# --- One service ------------------------------------------------------------------------------


@dataclass
class _Context:
    source: str
    base_dir: str
    namespace: str | None
    top_networks: Mapping[str, Any]
    pin_npus: bool = False


def _import_service(
    name: str, service: Mapping[str, Any], ctx: _Context
) -> tuple[ImportedService, dict[str, Any] | None]:
    """One vLLM service -> a validated ModelDeployment; also its x-npuswarm extension, if any."""
    notes = Notes()
    variables: set[str] = set()
    service = unescape(dict(service), variables)
    serve = vllm_serve_args(command_line(service))
    assert serve is not None  # the caller only passes vLLM services
    serve_args, wrapper = serve
    extension = service.get(EXTENSION) if isinstance(service.get(EXTENSION), dict) else None
    if wrapper:
        notes.mapped("command", f"unwrapped from `{wrapper}`: npuswarm runs vllm directly")
    if variables:
        notes.check(
            "variables",
            f"{', '.join(sorted(variables))} were filled in by docker stack deploy from the "
            "deploying shell; the manifest keeps them literally: replace them",
        )
    spec: dict[str, Any] = {}
    engine: dict[str, Any] = {}
    _map_image(service, spec, notes)
    _map_command(serve_args, spec, engine, notes)
    env, env_npus = _map_environment(service.get("environment"), notes)
    if env:
        engine["env"] = env
    spec["engine"] = engine
    _map_npus(service.get("devices"), env_npus, engine, spec, notes, pin=ctx.pin_npus)
    shm_from_tmpfs = _map_volumes(service.get("volumes"), ctx.base_dir, spec, notes)
    _map_shm(service.get("shm_size"), shm_from_tmpfs, spec, notes)
    _map_deploy(service.get("deploy"), spec, notes, pinned_by_export=extension is not None)
    _map_network(name, service.get("networks"), service.get("deploy"), ctx, spec, notes, extension)
    _map_ports(service.get("ports"), spec, notes)
    _map_healthcheck(service.get("healthcheck"), spec, notes)
    _map_init(service.get("init"), notes)
    _note_other_keys(service, notes)
    if extension is not None:
        _apply_extension(extension, spec, notes)
    _check_model_path(spec, notes)
    metadata = _metadata(name, extension, ctx, notes)
    manifest = {
        "apiVersion": meta.API_VERSION,
        "kind": deployment_api.KIND,
        "metadata": metadata,
        "spec": _in_field_order(spec),
    }
    try:
        deployment = ModelDeployment.model_validate(manifest)
    except ValidationError as error:
        raise StackFileError(validation_message(error)) from None
    imported = ImportedService(name, deployment, manifest, tuple(notes.items))
    return imported, extension


def _in_field_order(spec: dict[str, Any]) -> dict[str, Any]:
    """Keys in the order the API declares them, so every imported manifest reads alike."""
    engine = spec.get("engine", {})
    ordered = {k: spec[k] for k in deployment_api.ModelDeploymentSpec.model_fields if k in spec}
    ordered["engine"] = {k: engine[k] for k in deployment_api.Engine.model_fields if k in engine}
    return ordered


def _metadata(
    name: str, extension: Mapping[str, Any] | None, ctx: _Context, notes: Notes
) -> dict[str, Any]:
    namespace = ctx.namespace
    if extension is not None and isinstance(extension.get("deployment"), str):
        # An exported replica: the deployment it came from, not the per-replica service name.
        owner_namespace, _, owner_name = extension["deployment"].rpartition("/")
        metadata_name = dns_label(owner_name)
        namespace = namespace or owner_namespace or None
    else:
        metadata_name = dns_label(name)
        if metadata_name != name:
            notes.check("name", f"{name!r} is not a DNS label: named {metadata_name}")
    metadata: dict[str, Any] = {"name": metadata_name}
    if namespace:
        metadata["namespace"] = namespace
    metadata["annotations"] = {f"{labels.PREFIX}/imported-from": f"{ctx.source} service {name}"}
    return metadata


def _map_image(service: Mapping[str, Any], spec: dict[str, Any], notes: Notes) -> None:
    image = service.get("image")
    if not isinstance(image, str) or not image:
        raise StackFileError("has no image (stack deploy does not build images either)")
    spec["image"] = image
    notes.mapped("image", image)


# What only a member of a group spread over nodes is started with (rank offset, leader).
_GROUP_MEMBER_FLAGS = ("--data-parallel-address", "--data-parallel-start-rank", "-dpa", "-dpr")


def _map_command(
    args: list[str], spec: dict[str, Any], engine: dict[str, Any], notes: Notes
) -> None:
    serve = parse_serve_args(args, notes)
    group_flags = sorted(
        {a.split("=", 1)[0] for a in serve.extra} & {"--headless", *_GROUP_MEMBER_FLAGS}
    )
    if group_flags:
        raise StackFileError(
            f"looks like one node of a multi-node data-parallel group ({', '.join(group_flags)}); "
            "import-stack does not recognise groups: write one ModelDeployment with "
            "nodesPerReplica and engine.dataParallelSize instead (docs/multi-node.md)"
        )
    if serve.model is None:
        raise StackFileError("vllm serve has no model: give it as the first argument")
    spec["model"] = serve.model
    typed = [f"model={serve.model}"]
    if serve.served_model_name is not None:
        spec["servedModelName"] = serve.served_model_name
        typed.append(f"servedModelName={serve.served_model_name}")
    for value, key in (
        (serve.tensor_parallel_size, "tensorParallelSize"),
        (serve.enable_expert_parallel, "enableExpertParallel"),
        (serve.max_model_len, "maxModelLen"),
        (serve.port, "port"),
    ):
        if value is not None:
            engine[key] = value
            typed.append(f"engine.{key}={value}")
    if serve.port is None:
        notes.check("command --port", "not given: vLLM and npuswarm both default to 8000")
    if serve.extra:
        engine["extraArgs"] = serve.extra
        typed.append(f"engine.extraArgs={shlex.join(serve.extra)}")
    notes.mapped("command", "vllm serve -> " + ", ".join(typed))


def _map_environment(raw: Any, notes: Notes) -> tuple[dict[str, str], frozenset[int] | None]:
    """Env as a mapping; ASCEND_VISIBLE_DEVICES is returned apart: npuswarm owns it."""
    pairs: list[tuple[str, str | None]] = []
    if isinstance(raw, list):
        for item in raw:
            name, sep, text = str(item).partition("=")
            pairs.append((name, text if sep else None))
    elif isinstance(raw, dict):
        pairs = [(str(k), None if v is None else scalar(v)) for k, v in raw.items()]
    elif raw is not None:
        raise StackFileError("environment must be a list or a mapping")
    env: dict[str, str] = {}
    npus: frozenset[int] | None = None
    for key, value in pairs:
        if value is None:
            notes.dropped(f"environment {key}", "no value: stack deploy took it from the shell")
        elif key == "ASCEND_VISIBLE_DEVICES":
            try:
                npus = parse_npu_ids(value)
            except ValueError as error:
                raise StackFileError(f"environment {key}: {error}") from None
            notes.dropped(f"environment {key}", "npuswarm sets it from the placement")
        elif key in deployment_api.OPERATOR_OWNED_ENV:
            notes.dropped(f"environment {key}", "npuswarm sets it (0..N-1 inside the container)")
        else:
            env[key] = value
    if env:
        notes.mapped("environment", "engine.env: " + ", ".join(sorted(env)))
    return env, npus


def _map_npus(
    devices: Any,
    env_npus: frozenset[int] | None,
    engine: dict[str, Any],
    spec: dict[str, Any],
    notes: Notes,
    *,
    pin: bool = False,
) -> None:
    npus = _devices_npus(devices, notes)
    source = "devices"
    if npus is None and env_npus:
        npus, source = env_npus, "ASCEND_VISIBLE_DEVICES"
    if npus is None:
        notes.check(
            "npus", "no /dev/davinciN device: npusPerReplica defaults to the tensor parallel size"
        )
        return
    count = len(npus)
    if count not in deployment_api.NPU_COUNTS:
        raise StackFileError(
            f"{source} name {count} NPUs ({format_npu_ids(npus)}); npuswarm gives a replica "
            f"1, 2, 4 or 8 NPUs"
        )
    spec["npusPerReplica"] = count
    if pin:
        spec["npuIds"] = sorted(npus)
        notes.mapped(
            source,
            f"npusPerReplica={count}, npuIds={sorted(npus)} (--pin-npus: every replica uses "
            "exactly these NPUs, one replica per node)",
        )
    else:
        notes.mapped(
            source,
            f"npusPerReplica={count} (the stack fixed NPUs {format_npu_ids(npus)}; npuswarm "
            "chooses free NPUs per replica)",
        )
    tp = engine.get("tensorParallelSize", 1)
    if tp != count:
        notes.check("npus", f"{count} NPUs but --tensor-parallel-size is {tp}")


def _devices_npus(devices: Any, notes: Notes) -> frozenset[int] | None:
    if devices is None:
        return None
    if not isinstance(devices, list):
        raise StackFileError("devices must be a list")
    npus: set[int] = set()
    control, other = [], []
    for item in devices:
        host = str(item.get("source", "")) if isinstance(item, dict) else str(item).split(":")[0]
        npu = npu_id_from_device(posixpath.basename(host)) if host.startswith("/dev/") else None
        if npu is not None:
            npus.add(npu)
        elif host in RUNTIME_CONTROL_DEVICES:
            control.append(host)
        else:
            other.append(host)
    if control:
        notes.dropped("devices", f"{', '.join(control)}: Ascend Docker Runtime adds them")
    if other:
        notes.dropped(
            "devices",
            f"{', '.join(other)}: Swarm services cannot have devices; only NPUs "
            "reach a task (through ASCEND_VISIBLE_DEVICES)",
        )
    return frozenset(npus) if npus else None


@dataclass(frozen=True)
class _Mount:
    source: str
    target: str
    read_only: bool


def _map_volumes(raw: Any, base_dir: str, spec: dict[str, Any], notes: Notes) -> int | None:
    """Bind mounts -> spec.volumes; returns the size of a tmpfs on /dev/shm, if one is given."""
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise StackFileError("volumes must be a list")
    volumes: list[dict[str, Any]] = []
    driver: list[str] = []
    shm: int | None = None
    for item in raw:
        if isinstance(item, dict) and item.get("type") == "tmpfs":
            shm = _tmpfs_volume(item, notes) if shm is None else shm
            continue
        mount = _bind_mount(item, base_dir, notes)
        if mount is None:
            continue
        if mount.source in RUNTIME_DRIVER_MOUNTS:
            driver.append(mount.source)
        elif mount.target == SHM_PATH:
            notes.dropped(
                f"volumes {mount.source}", "npuswarm gives /dev/shm its own sized tmpfs (shmSize)"
            )
        elif any(v["mountPath"] == mount.target for v in volumes):
            notes.dropped(f"volumes {mount.source}", f"{mount.target} is already mounted")
        else:
            # Explicit both ways: compose mounts read-write by default, npuswarm read-only.
            volume: dict[str, Any] = {
                "hostPath": mount.source,
                "mountPath": mount.target,
                "readOnly": mount.read_only,
            }
            if not mount.read_only:
                notes.check(
                    f"volumes {mount.source}",
                    "mounted writable as in the stack file; npuswarm allows writes only under "
                    "roots the admin marks :rw in NPUSWARM_ALLOWED_HOST_PATHS (else set readOnly)",
                )
            volumes.append(volume)
    if driver:
        notes.dropped("volumes", f"{', '.join(driver)}: Ascend Docker Runtime mounts the driver")
    if volumes:
        spec["volumes"] = volumes
        notes.mapped("volumes", ", ".join(f"{v['hostPath']}:{v['mountPath']}" for v in volumes))
    for volume in volumes:
        # Judged by the default settings: the cluster's own allow-list is not known here.
        problem = host_path_violation(volume["hostPath"], DEFAULT_ALLOWED_HOST_PATHS)
        if problem is not None:
            notes.check(
                f"volumes {volume['hostPath']}",
                f"{problem}: the operator would refuse this deployment (PolicyViolation)",
            )
    return shm


def _tmpfs_volume(item: Mapping[str, Any], notes: Notes) -> int | None:
    target = clean_path(str(item.get("target", "")))
    size = (item.get("tmpfs") or {}).get("size")
    if target != SHM_PATH or size is None:
        notes.dropped(f"volumes tmpfs {target}", "no ModelDeployment field for other tmpfs mounts")
        return None
    try:
        return ram_bytes(size)
    except ValueError as error:
        raise StackFileError(f"volumes tmpfs {target}: {error}") from None


def _bind_mount(item: Any, base_dir: str, notes: Notes) -> _Mount | None:
    if isinstance(item, dict):
        kind = item.get("type", "volume")
        source, target = str(item.get("source", "")), str(item.get("target", ""))
        read_only = bool(item.get("read_only", False))
        if kind != "bind":
            notes.dropped(f"volumes {source or target}", f"type {kind}: npuswarm mounts host paths")
            return None
        if item.get("bind"):
            notes.dropped(f"volumes {source}", "bind options (propagation) have no field")
    else:
        parts = str(item).split(":")
        if len(parts) == 1:
            notes.dropped(f"volumes {item}", "anonymous volume: npuswarm mounts host paths")
            return None
        source, target = parts[0], parts[1]
        options = set(parts[2].split(",")) if len(parts) > 2 else set()
        read_only = "ro" in options
        if options - {"ro", "rw"}:
            notes.dropped(f"volumes {item}", f"options {sorted(options - {'ro', 'rw'})}")
    host = _host_path(source, base_dir, notes)
    if host is None or not target.startswith("/"):
        return None
    return _Mount(host, clean_path(target), read_only)


def _host_path(source: str, base_dir: str, notes: Notes) -> str | None:
    if source.startswith("/"):
        return clean_path(posixpath.normpath(source))
    if source == "." or source.startswith(("./", "../")):
        # stack deploy resolves it against the stack file's folder on the deploying machine.
        resolved = clean_path(posixpath.normpath(posixpath.join(base_dir, source)))
        notes.check(
            f"volumes {source}",
            f"relative path resolved to {resolved}: it must exist on every node",
        )
        return resolved
    if source.startswith("~"):
        notes.dropped(f"volumes {source}", "~ is the deploying user's home: write an absolute path")
        return None
    notes.dropped(f"volumes {source}", "named volume: npuswarm mounts host paths only")
    return None


def _map_shm(raw: Any, from_tmpfs: int | None, spec: dict[str, Any], notes: Notes) -> None:
    if from_tmpfs is not None:
        spec["shmSize"] = quantity(from_tmpfs)
        notes.mapped("volumes tmpfs /dev/shm", f"shmSize={spec['shmSize']}")
        if raw is not None:
            notes.dropped("shm_size", "the /dev/shm tmpfs mount is what Swarm applied")
        return
    if raw is None:
        default = deployment_api.ModelDeploymentSpec.model_fields["shmSize"].default
        notes.check("shm_size", f"not given: npuswarm's default /dev/shm size is {default}")
        return
    try:
        spec["shmSize"] = quantity(ram_bytes(raw))
    except ValueError as error:
        raise StackFileError(f"shm_size: {error}") from None
    notes.mapped("shm_size", f"shmSize={spec['shmSize']} (a tmpfs on /dev/shm)")


def _map_deploy(raw: Any, spec: dict[str, Any], notes: Notes, *, pinned_by_export: bool) -> None:
    deploy: Mapping[str, Any] = raw if isinstance(raw, dict) else {}
    mode = deploy.get("mode", "replicated")
    if mode == "global":
        spec["mode"] = "PerNode"
        notes.mapped("deploy.mode", "global -> mode=PerNode (one replica per matching node)")
        if "replicas" in deploy:
            notes.dropped("deploy.replicas", "global mode has no replica count")
    elif mode == "replicated":
        spec["mode"] = "Replicated"
        spec["replicas"] = int(deploy.get("replicas", 1))
        notes.mapped("deploy.mode", f"replicated -> mode=Replicated, replicas={spec['replicas']}")
    else:
        raise StackFileError(f"deploy.mode {mode}: a model server is not a job")
    _map_restart(deploy.get("restart_policy"), spec, notes)
    _map_placement(deploy.get("placement"), spec, notes, pinned_by_export=pinned_by_export)
    for key, reason in (
        ("resources", "npuswarm reserves NPUs itself; no field for CPU or memory limits"),
        ("update_config", "replicas roll by spec.updateStrategy"),
        ("rollback_config", "replicas roll by spec.updateStrategy"),
        ("labels", "npuswarm sets the service labels"),
    ):
        if key in deploy:
            notes.dropped(f"deploy.{key}", reason)


def _map_restart(raw: Any, spec: dict[str, Any], notes: Notes) -> None:
    if not isinstance(raw, dict):
        return
    policy: dict[str, Any] = {}
    if "condition" in raw:
        policy["condition"] = raw["condition"]
    if "delay" in raw:
        policy["delaySeconds"] = _whole_seconds(raw["delay"], "deploy.restart_policy.delay", notes)
    else:
        notes.check(
            "deploy.restart_policy.delay",
            f"not given: Swarm waited {SWARM_RESTART_DELAY_SECONDS}s, npuswarm waits "
            f"{deployment_api.RestartPolicy.model_fields['delaySeconds'].default}s",
        )
    if "max_attempts" in raw:
        policy["maxAttempts"] = raw["max_attempts"]
    if "window" in raw:
        notes.dropped("deploy.restart_policy.window", "no ModelDeployment field")
    spec["restartPolicy"] = policy
    notes.mapped("deploy.restart_policy", ", ".join(f"{k}={v}" for k, v in policy.items()))


def _whole_seconds(value: Any, key: str, notes: Notes) -> int:
    try:
        nanoseconds = duration_ns(value)
    except ValueError as error:
        raise StackFileError(f"{key}: {error}") from None
    seconds = math.ceil(nanoseconds / SECOND_NS)
    if seconds * SECOND_NS != nanoseconds:
        notes.check(key, f"{value} rounded up to {seconds}s (npuswarm counts whole seconds)")
    return seconds


def _map_placement(raw: Any, spec: dict[str, Any], notes: Notes, *, pinned_by_export: bool) -> None:
    placement: Mapping[str, Any] = raw if isinstance(raw, dict) else {}
    selector: dict[str, str] = {}
    for constraint in placement.get("constraints") or []:
        text = str(constraint).strip()
        match = _NODE_LABEL_EQ.match(text)
        if match:
            selector[match.group(1)] = match.group(2)
        elif pinned_by_export and text.startswith("node.id=="):
            notes.dropped(f"constraint {text}", "the exported replica's node: npuswarm places it")
        else:
            notes.dropped(f"constraint {text}", _constraint_reason(text))
    if selector:
        spec["nodeSelector"] = selector
        notes.mapped("deploy.placement.constraints", f"nodeSelector={selector}")
    for key in ("preferences", "max_replicas_per_node"):
        if key in placement:
            notes.dropped(f"deploy.placement.{key}", "npuswarm packs replicas by free NPUs")


def _constraint_reason(text: str) -> str:
    if text.startswith("node.labels.") and "!=" in text:
        return "nodeSelector can only require a label value (==)"
    if text.startswith(("node.hostname", "node.id")):
        return (
            "nodeSelector matches node labels only: label the node "
            "(docker node update --label-add KEY=VALUE) and select that label"
        )
    return "nodeSelector matches Swarm node labels (node.labels.KEY==VALUE) only"


def _map_network(
    name: str,
    raw: Any,
    deploy: Any,
    ctx: _Context,
    spec: dict[str, Any],
    notes: Notes,
    extension: Mapping[str, Any] | None,
) -> None:
    names: list[str] = []
    settings: Mapping[str, Any] = {}
    if isinstance(raw, list):
        names = [str(n) for n in raw]
    elif isinstance(raw, dict):
        names = [str(n) for n in raw]
        settings = raw
    if not names:
        notes.check(
            "networks",
            "none: the stack put the service on its default network; without spec.network "
            "the model is reachable only through spec.publish",
        )
        return
    first = names[0]
    aliases = [str(a) for a in ((settings.get(first) or {}).get("aliases") or [])]
    # Clients reach a stack service by its service name; an exported replica's only alias
    # is its deployment's.
    alias = aliases[0] if extension is not None and aliases else dns_label(name)
    network: dict[str, Any] = {"name": _swarm_network_name(first, ctx, notes), "alias": alias}
    endpoint = (deploy or {}).get("endpoint_mode") if isinstance(deploy, dict) else None
    if endpoint is not None:
        network["endpointMode"] = endpoint
    spec["network"] = network
    notes.mapped("networks", f"network.name={network['name']}, alias={alias}")
    if alias != name and extension is None:
        notes.check("networks", f"clients that used {name!r} must use {alias!r}")
    ignored_aliases = [a for a in aliases if a != alias]
    if ignored_aliases:
        notes.dropped(f"networks {first} aliases", f"{ignored_aliases}: one alias per model")
    if len(names) > 1:
        notes.dropped("networks", f"{names[1:]}: a ModelDeployment joins one network")


def _swarm_network_name(key: str, ctx: _Context, notes: Notes) -> str:
    declared = ctx.top_networks.get(key)
    config: Mapping[str, Any] = declared if isinstance(declared, dict) else {}
    actual = str(config.get("name") or key)
    if config.get("external"):
        return actual
    notes.check(
        f"network {key}",
        f"the stack created it (as <stack>_{key} unless named) and `docker stack rm` removes "
        f"it: let npuswarm create {actual} for the deployments' namespace (remove the stack "
        f"first), or create it with `docker network create --driver overlay --attachable "
        f"{actual}` and have the admin share it (NPUSWARM_SHARED_NETWORKS={actual}=<namespace>)",
    )
    return actual


def _map_ports(raw: Any, spec: dict[str, Any], notes: Notes) -> None:
    if not raw:
        return
    published: list[tuple[int, int | None, str, str]] = []  # (published, target, proto, mode)
    for item in raw:
        parsed = _port(item)
        if parsed is None:
            notes.dropped(f"ports {item}", "no published port (or a range)")
        else:
            published.append(parsed)
    tcp = [p for p in published if p[2] == "tcp"]
    for extra in [p for p in published if p not in tcp[:1]]:
        notes.dropped(f"ports {extra[0]}", "a ModelDeployment publishes one TCP port (vLLM's)")
    if not tcp:
        return
    port, target, _, mode = tcp[0]
    several = spec.get("mode") == "PerNode" or spec.get("replicas", 1) > 1
    if mode == "ingress" and several:
        mode = "host"
        notes.check(
            f"ports {port}",
            "ingress mode allows one replica in npuswarm (one service per replica): published "
            "in host mode on each replica's node instead",
        )
    if mode == "ingress" and (spec.get("network") or {}).get("endpointMode") == "dnsrr":
        mode = "host"
        notes.check(
            "ports",
            "Swarm rejects an ingress port with endpoint_mode dnsrr: published in host mode",
        )
    spec["publish"] = {"port": port, "mode": mode}
    notes.mapped(f"ports {port}", f"publish.port={port}, publish.mode={mode}")
    if mode == "ingress":
        _ingress_endpoint(spec, notes)
    vllm_port = spec["engine"].get("port", 8000)
    if target is not None and target != vllm_port:
        notes.check(f"ports {port}", f"targeted {target}; npuswarm targets vLLM's port {vllm_port}")


def _ingress_endpoint(spec: dict[str, Any], notes: Notes) -> None:
    """Swarm rejects an ingress port on a dnsrr service (swarmkit#1693); npuswarm defaults to
    dnsrr, but the stack, where nothing was said, used compose's vip."""
    network = spec.get("network")
    if network is None:
        return
    if "endpointMode" not in network:
        network["endpointMode"] = "vip"
        notes.mapped("deploy.endpoint_mode", "vip: compose's default, needed by an ingress port")


def _port(item: Any) -> tuple[int, int | None, str, str] | None:
    if isinstance(item, dict):
        if item.get("published") is None:
            return None
        target = item.get("target")
        return (
            int(item["published"]),
            int(target) if target is not None else None,
            str(item.get("protocol", "tcp")),
            str(item.get("mode", "ingress")),
        )
    text, _, protocol = str(item).partition("/")
    parts = text.split(":")
    if len(parts) < 2 or "-" in text:
        return None
    try:
        return int(parts[-2]), int(parts[-1]), protocol or "tcp", "ingress"
    except ValueError:
        return None


def _map_healthcheck(raw: Any, spec: dict[str, Any], notes: Notes) -> None:
    if not isinstance(raw, dict):
        return
    test = raw.get("test")
    words = [test] if isinstance(test, str) else [str(t) for t in test or []]
    if raw.get("disable") or words[:1] == ["NONE"]:
        notes.dropped("healthcheck", "npuswarm always checks health: Ready depends on it")
        return
    check: dict[str, Any] = {}
    url = _URL.search(" ".join(words))
    if url is not None:
        check["path"] = url.group(1) or "/"
    if words:
        detail = f"path={check['path']}" if url else "no HTTP URL in it, so /health"
        notes.mapped("healthcheck.test", f"{detail} (npuswarm probes vLLM's port itself)")
    for key, target, minimum in (
        ("interval", "intervalSeconds", 1),
        ("timeout", "timeoutSeconds", 1),
        ("start_period", "startPeriodSeconds", 0),
    ):
        if key in raw:
            seconds = _whole_seconds(raw[key], f"healthcheck.{key}", notes)
            check[target] = max(seconds, minimum)
    if "retries" in raw:
        check["retries"] = raw["retries"]
    spec["healthCheck"] = check
    notes.mapped("healthcheck", ", ".join(f"{k}={v}" for k, v in check.items()))


def _map_init(raw: Any, notes: Notes) -> None:
    if raw is True:
        notes.mapped("init", "npuswarm always runs an init process")
    elif raw is False:
        notes.dropped("init", "npuswarm always runs an init process")


_MAPPED_KEYS = frozenset(
    {
        "image",
        "entrypoint",
        "command",
        "environment",
        "devices",
        "volumes",
        "shm_size",
        "deploy",
        "networks",
        "ports",
        "healthcheck",
        "init",
    }
)
_DROP_REASONS = {
    "privileged": "NPUs reach the task through Ascend Docker Runtime, not privileged mode",
    "restart": "deploy.restart_policy is what Swarm uses",
    "network_mode": "npuswarm attaches spec.network (host networking clashes HCCL ports)",
    "build": "Swarm runs images; build and push it, then set image",
    "env_file": "read on the deploying machine: copy the variables into engine.env",
    "labels": "npuswarm sets the container labels",
    "container_name": "Swarm names tasks itself",
    "expose": "services on one network reach every port",
}


# What ignoring a key meant for the old services: the reason they never served.
_IGNORED_EFFECT = {
    "devices": "the tasks started without any NPU",
    "shm_size": "/dev/shm was Docker's default 64 MiB",
    "privileged": "the tasks were not privileged",
}


def _note_other_keys(service: Mapping[str, Any], notes: Notes) -> None:
    """Every key not mapped is reported: silently losing `privileged` is how the seed failed."""
    for key in sorted(service):
        if key in _MAPPED_KEYS or key.startswith("x-"):
            continue
        reason = _DROP_REASONS.get(key, "no ModelDeployment field for it")
        if key in SWARM_FORBIDDEN:
            reason = f"docker stack deploy refuses it; {reason}"
        notes.dropped(key, reason)
    ignored = sorted(k for k in service if k in SWARM_UNSUPPORTED or k in SWARM_DEPRECATED)
    older = sorted(k for k in service if k in SWARM_UNSUPPORTED_BEFORE)
    if ignored:
        effects = [f"{k}: {_IGNORED_EFFECT[k]}" for k in ignored if k in _IGNORED_EFFECT]
        notes.items.append(
            Note(
                "swarm-ignored",
                ", ".join(ignored),
                'docker stack deploy ignored these ("Ignoring unsupported options") and '
                "deployed anyway" + (f"; so {'; '.join(effects)}" if effects else ""),
            )
        )
    if older:
        versions = ", ".join(f"{k} before {SWARM_UNSUPPORTED_BEFORE[k]}" for k in older)
        notes.items.append(
            Note("swarm-ignored", ", ".join(older), f"ignored by older docker CLIs ({versions})")
        )


def _apply_extension(extension: Mapping[str, Any], spec: dict[str, Any], notes: Notes) -> None:
    """What an npuswarm export kept out of compose: the deployment's mode and update strategy."""
    mode = extension.get("mode")
    if mode in ("Replicated", "PerNode"):
        spec["mode"] = mode
        spec.pop("replicas", None)
        if mode == "Replicated":
            spec["replicas"] = int(extension.get("replicas", 1))
    if isinstance(extension.get("updateStrategy"), dict):
        spec["updateStrategy"] = dict(extension["updateStrategy"])
    if isinstance(extension.get("npuIds"), list):
        spec["npuIds"] = [int(i) for i in extension["npuIds"]]
    notes.mapped(EXTENSION, f"mode={spec.get('mode')}, replicas={spec.get('replicas', '-')}")


def _check_model_path(spec: Mapping[str, Any], notes: Notes) -> None:
    model = str(spec.get("model", ""))
    if not model.startswith("/"):
        return
    mounts = [v["mountPath"] for v in spec.get("volumes", [])]
    if not any(model == m or model.startswith(m.rstrip("/") + "/") for m in mounts):
        notes.check("model", f"{model} is under no mounted volume: it must be in the image")


def import_stack(
    compose: Mapping[str, Any],
    *,
    source: str = "stack file",
    base_dir: str = "/",
    namespace: str | None = None,
    pin_npus: bool = False,
) -> StackImport:
    """Every vLLM service of a parsed compose file as a validated ModelDeployment.

    All services are converted before anything is returned, and every error is collected,
    so the caller can report them together and never write part of the result.
    """
    networks = compose.get("networks")
    ctx = _Context(
        source, base_dir, namespace, networks if isinstance(networks, dict) else {}, pin_npus
    )
    imported: list[tuple[ImportedService, Mapping[str, Any] | None]] = []
    skipped: list[Note] = []
    errors: list[str] = []
    for name, service in compose["services"].items():
        if not isinstance(service, dict):
            errors.append(f"service {name}: not a mapping")
            continue
        try:
            if vllm_serve_args(command_line(service)) is None:
                skipped.append(Note("skipped", str(name), _why_not_vllm(command_line(service))))
                continue
            imported.append(_import_service(str(name), service, ctx))
        except StackFileError as error:
            errors.append(f"service {name}: {error}")
    if errors:
        raise StackFileError("\n".join(errors))
    if not imported:
        why = "; ".join(f"{n.key}: {n.text}" for n in skipped)
        raise StackFileError(f"{source}: no service runs `vllm serve` ({why})")
    services = _merge_exported_replicas(imported)
    _check_unique_names(services)
    return StackImport(services, skipped)


def _why_not_vllm(argv: Sequence[str]) -> str:
    if any("vllm.entrypoints" in word for word in argv):
        return "runs vLLM's api_server module; rewrite it as `vllm serve MODEL ...` to import it"
    shown = shlex.join(argv[:4]) + (" ..." if len(argv) > 4 else "") if argv else "image default"
    return f"not a vLLM service (runs {shown})"


def _merge_exported_replicas(
    imported: Sequence[tuple[ImportedService, Mapping[str, Any] | None]],
) -> list[ImportedService]:
    """Services an export wrote for the replicas of one deployment become that one deployment."""
    groups: dict[str, list[ImportedService]] = {}
    for service, extension in imported:
        key = f"service:{service.service}"  # plain services are never merged
        if extension is not None and isinstance(extension.get("deployment"), str):
            key = f"{EXTENSION}:{extension['deployment']}"
        groups.setdefault(key, []).append(service)
    merged: list[ImportedService] = []
    for group in groups.values():
        first = group[0]
        for other in group[1:]:
            if other.deployment.spec != first.deployment.spec:
                raise StackFileError(
                    f"services {first.service} and {other.service} are replicas of "
                    f"{first.name} but differ beyond their node and NPUs"
                )
        if len(group) > 1:
            names = ", ".join(s.service for s in group)
            note = Note("mapped", "services", f"{names}: replicas of one deployment")
            first = ImportedService(names, first.deployment, first.manifest, (*first.notes, note))
        merged.append(first)
    return merged


def _check_unique_names(services: Sequence[ImportedService]) -> None:
    seen: dict[str, str] = {}
    for service in services:
        other = seen.setdefault(service.name, service.service)
        if other != service.service:
            raise StackFileError(
                f"services {other} and {service.service} would both be ModelDeployment "
                f"{service.name}: rename one"
            )


# --- Output of an import ----------------------------------------------------------------------


def manifest_yaml(service: ImportedService) -> str:
    """One manifest, headed by the notes a reviewer needs before applying it."""
    header = [f"# {service.name}: imported from service {service.service} by npuswarm import-stack"]
    header += [
        f"# {note.kind} {note.key}: {note.text}"
        for note in service.notes
        if note.kind in ("dropped", "check", "swarm-ignored")
    ]
    body = yaml.safe_dump(service.manifest, sort_keys=False, default_flow_style=False)
    return "\n".join(header) + "\n" + body


def manifests_yaml(result: StackImport) -> str:
    return "---\n".join(manifest_yaml(service) for service in result.services)


def import_report(result: StackImport) -> str:
    """The per-service account printed to stderr."""
    lines: list[str] = []
    for service in result.services:
        lines.append(f"service {service.service} -> ModelDeployment {service.name}")
        lines += [f"  {note}" for note in service.notes]
    lines += [f"service {note.key}: skipped, {note.text}" for note in result.skipped]
    return "\n".join(lines) + "\n"
