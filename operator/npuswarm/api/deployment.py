"""The ModelDeployment API: the single source of truth for the CRD schema and for validation.

Field names are camelCase because they are the wire format users write in YAML; the CRD in
crds/ is generated from these models (``npuswarm crd``), so editing a field here and
forgetting to regenerate fails a test.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    field_validator,
    model_validator,
)

from npuswarm.api.meta import (
    API_VERSION,
    IMAGE_PATTERN,
    MAX_STRING,
    NETWORK_NAME_PATTERN,
    Condition,
    Resource,
    _Model,
)

KIND = "ModelDeployment"
PLURAL = "modeldeployments"
SINGULAR = "modeldeployment"
SHORT_NAMES = ["md"]


def _not_float(value: Any) -> Any:
    """2.0 is not an integer, here as in the API server (crd.py adds the rule there: the
    OpenAPI check alone takes it); strict mode already refuses it except in a Literal."""
    if isinstance(value, float):
        raise ValueError("must be an integer")
    return value


NPU_COUNTS = (1, 2, 4, 8)
NpuCount = Annotated[Literal[1, 2, 4, 8], BeforeValidator(_not_float)]

# Env names the operator owns: a user value would silently give a replica the wrong NPUs.
OPERATOR_OWNED_ENV = frozenset({"ASCEND_VISIBLE_DEVICES", "ASCEND_RT_VISIBLE_DEVICES"})
# `vllm serve` flags rendered from typed fields; repeating them in extraArgs would make the
# command line ambiguous (vLLM takes the last one), so they are rejected instead.
OPERATOR_OWNED_FLAGS = frozenset(
    {
        "--port",
        "--host",
        "--served-model-name",
        "--tensor-parallel-size",
        "-tp",
        "--max-model-len",
        "--enable-expert-parallel",
        "--enable_expert_parallel",
    }
)

_QUANTITY = re.compile(r"^([0-9]+)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_QUANTITY_FACTORS = {
    None: 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}
QUANTITY_PATTERN = _QUANTITY.pattern
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
# A Swarm network alias is a DNS label.
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# Networks that would give a replica the node's network stack, or that Swarm manages itself.
RESERVED_NETWORKS = ("host", "bridge", "none", "ingress", "docker_gwbridge")
# A path segment that is neither '.' nor '..' (RE2 has no lookahead, so spelled out).
_SEGMENT = r"([^/.\x00][^/\x00]*|\.[^/.\x00][^/\x00]*|\.\.[^/\x00]+)"
# Absolute, no '.', '..' or empty segments: the path means what it says on every node.
HOST_PATH_PATTERN = rf"^(/|(/{_SEGMENT})+/?)$"
MOUNT_PATH_PATTERN = rf"^(/{_SEGMENT})+/?$"
# NUL cannot cross execve or the Engine API; everything else is passed as one argv/env item.
NO_NUL_PATTERN = r"^[^\x00]*$"
# An argument vLLM would read as a flag where a value is expected (model, served name).
NOT_A_FLAG_PATTERN = r"^[^-\x00][^\x00]*$"
MAX_SHM_BYTES = 2**40  # 1Ti
# A multi-node replica (a data-parallel group, docs/multi-node.md): at most this many nodes.
MAX_NODES_PER_REPLICA = 64
MAX_DATA_PARALLEL = 512
# `vllm serve` flags npuswarm renders for a data-parallel group (ranks, leader address, ports),
# by prefix: a user value would give two members the same rank or point one at the wrong
# leader. Prefixes, not a regex: a regex over every extraArgs item exceeds the API server's
# CEL cost budget at the spec level, where nodesPerReplica can be read.
GROUP_OWNED_PREFIXES = ("--data-parallel", "--data_parallel", "--headless", "-dp")
# A Kubernetes-style label key (optional DNS prefix, then a name).
LABEL_KEY_PATTERN = r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"

# Bounds a user would expect, and that keep every number inside what Docker stores (int64
# nanoseconds) and every list small enough for the API server's validation cost budget.
MAX_REPLICAS = 1000
# As Kubernetes PriorityClass values: user priorities are at most a billion.
MAX_PRIORITY = 10**9
MAX_ARG = 4096
MAX_ENV_VALUE = 32768
MAX_ITEMS = 128
MAX_VOLUMES = 32
DAY_SECONDS = 86400


def quantity_to_bytes(quantity: str) -> int:
    """Parse a Kubernetes-style binary/decimal quantity such as ``1Gi`` or ``512M``."""
    match = _QUANTITY.match(quantity)
    if match is None:
        raise ValueError(f"not a size quantity: {quantity!r} (use e.g. 512Mi, 1Gi, 16G)")
    return int(match.group(1)) * _QUANTITY_FACTORS[match.group(2)]


def _without_null_values(mapping: Any) -> Any:
    """The API server drops null values of a string map, as it drops null fields."""
    if isinstance(mapping, dict):
        return {key: value for key, value in mapping.items() if value is not None}
    return mapping


class Engine(_Model):
    """How vLLM is started inside the container."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.extraArgs) || self.extraArgs.all(a, "
                    "!a.replace('_', '-').matches('(?s)^("
                    + "|".join(sorted(OPERATOR_OWNED_FLAGS))
                    + ")(=.*)?$'))",
                    "message": "extraArgs must not set a flag rendered from a typed engine field "
                    "(" + ", ".join(sorted(OPERATOR_OWNED_FLAGS)) + ")",
                },
                {
                    "rule": "!has(self.env) || self.env.all(k, k.matches('"
                    + ENV_NAME_PATTERN
                    + "') && size(k) <= 256)",
                    "message": "env names must match " + ENV_NAME_PATTERN + " (at most 256)",
                },
                {
                    "rule": "!has(self.env) || self.env.all(k, !(k in ["
                    + ", ".join(f"'{n}'" for n in sorted(OPERATOR_OWNED_ENV))
                    + "]))",
                    "message": "env must not set "
                    + " or ".join(sorted(OPERATOR_OWNED_ENV))
                    + ": npuswarm sets it from the placement",
                },
            ]
        }
    )

    tensorParallelSize: NpuCount = Field(1, description="vLLM --tensor-parallel-size.")
    dataParallelSize: Annotated[int, Field(ge=1, le=MAX_DATA_PARALLEL)] | None = Field(
        None,
        description=(
            "vLLM --data-parallel-size: data-parallel ranks of one replica over all its nodes. "
            "Each node runs dataParallelSize / nodesPerReplica ranks of tensorParallelSize "
            "NPUs, so npusPerReplica (NPUs on each node) must equal that product. Defaults "
            "to nodesPerReplica x npusPerReplica / tensorParallelSize on a multi-node replica; "
            "unset (vLLM's 1) otherwise."
        ),
    )
    enableExpertParallel: bool = Field(False, description="vLLM --enable-expert-parallel.")
    maxModelLen: Annotated[int, Field(ge=1, le=2**24)] | None = Field(
        None, description="vLLM --max-model-len; vLLM's default when unset."
    )
    port: Annotated[int, Field(ge=1, le=65535)] = Field(
        8000, description="Port vLLM listens on inside the container."
    )
    extraArgs: list[Annotated[str, Field(max_length=MAX_ARG, pattern=NO_NUL_PATTERN)]] = Field(
        default_factory=list,
        max_length=MAX_ITEMS,
        description="More `vllm serve` arguments, one list item per argument (no shell).",
    )
    env: dict[str, Annotated[str, Field(max_length=MAX_ENV_VALUE, pattern=NO_NUL_PATTERN)]] = Field(
        default_factory=dict,
        max_length=MAX_ITEMS,
        description="Environment of the vLLM process; names match " + ENV_NAME_PATTERN + ".",
    )

    @field_validator("env", mode="before")
    @classmethod
    def _null_values_are_unset(cls, env: Any) -> Any:
        return _without_null_values(env)

    @field_validator("extraArgs")
    @classmethod
    def _no_owned_flags(cls, args: list[str]) -> list[str]:
        for arg in args:
            # vLLM's parser takes --max_model_len for --max-model-len.
            flag = arg.split("=", 1)[0].replace("_", "-")
            if flag in OPERATOR_OWNED_FLAGS:
                raise ValueError(
                    f"extraArgs must not set {flag}: it is rendered from the typed engine field"
                )
        return args

    @field_validator("env")
    @classmethod
    def _no_owned_env(cls, env: dict[str, str]) -> dict[str, str]:
        for name in env:
            # fullmatch: re's '$' would also match before a trailing newline.
            if not re.fullmatch(ENV_NAME_PATTERN.strip("^$"), name) or len(name) > 256:
                raise ValueError(f"env name {name!r} is not a valid variable name")
            if name in OPERATOR_OWNED_ENV:
                raise ValueError(f"env must not set {name}: npuswarm sets it from the placement")
        return env


class Volume(_Model):
    hostPath: str = Field(
        ...,
        max_length=MAX_STRING,
        pattern=HOST_PATH_PATTERN,
        description=(
            "Absolute host path without '.' or '..' segments; the operator allows only paths "
            "under its allow-list (NPUSWARM_ALLOWED_HOST_PATHS)."
        ),
    )
    mountPath: str = Field(
        ...,
        max_length=MAX_STRING,
        pattern=MOUNT_PATH_PATTERN,
        description="Absolute path in the container (not /), without '.' or '..' segments.",
    )
    readOnly: bool = Field(
        True,
        description=(
            "Mounted read-only unless false; writable mounts only under a root the operator "
            "allows writes for (NPUSWARM_ALLOWED_HOST_PATHS=...,/data:rw)."
        ),
    )


class Network(_Model):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!(self.name in ["
                    + ", ".join(f"'{n}'" for n in RESERVED_NETWORKS)
                    + "])",
                    "message": "network.name must be an overlay network of your own, not "
                    + ", ".join(RESERVED_NETWORKS),
                }
            ]
        }
    )

    name: str = Field(
        ...,
        max_length=255,
        pattern=NETWORK_NAME_PATTERN,
        description="An existing attachable overlay network.",
    )
    alias: str | None = Field(
        None,
        pattern=DNS_LABEL_PATTERN,
        max_length=63,
        description="DNS name of the model on the network; defaults to the resource name.",
    )
    endpointMode: Literal["vip", "dnsrr"] = Field(
        "dnsrr",
        description=(
            "vip needs IPVS on every node; dnsrr resolves the alias to every replica's task."
        ),
    )

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if name in RESERVED_NETWORKS:
            raise ValueError(f"network.name must be an overlay network of your own, not {name!r}")
        return name


class Publish(_Model):
    port: Annotated[int, Field(ge=1, le=65535)] = Field(..., description="Published port.")
    mode: Literal["host", "ingress"] = Field(
        "host",
        description=(
            "host: published on the replica's node (one replica per node); "
            "ingress: the routing mesh (only with a single replica)."
        ),
    )


class HealthCheck(_Model):
    # The path is pasted into the probe command: no quotes, spaces or backslashes.
    path: str = Field(
        "/health",
        max_length=MAX_STRING,
        pattern=r"^/[A-Za-z0-9/._~%&=?-]*$",
        description="HTTP path vLLM answers 200 on.",
    )
    startPeriodSeconds: Annotated[int, Field(ge=0, le=DAY_SECONDS)] = Field(
        1800, description="Time a model may take to load before failed checks count."
    )
    intervalSeconds: Annotated[int, Field(ge=1, le=DAY_SECONDS)] = 30
    timeoutSeconds: Annotated[int, Field(ge=1, le=DAY_SECONDS)] = 10
    retries: Annotated[int, Field(ge=1, le=100)] = 3


class UpdateStrategy(_Model):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.maxUnavailable) || !has(self.maxSurge) "
                    "|| self.maxUnavailable > 0 || self.maxSurge > 0",
                    "message": "maxUnavailable and maxSurge cannot both be 0: "
                    "no update could start",
                }
            ]
        }
    )

    maxUnavailable: Annotated[int, Field(ge=0, le=MAX_REPLICAS)] = Field(
        1, description="Replicas that may be down at once while a spec change rolls out."
    )
    maxSurge: Annotated[int, Field(ge=0, le=MAX_REPLICAS)] = Field(
        0,
        description=(
            "Replicas that may start on spare NPUs before their old copy is removed; "
            "0 keeps every replica on its NPUs (stop first, then start)."
        ),
    )

    @model_validator(mode="after")
    def _can_progress(self) -> UpdateStrategy:
        if self.maxUnavailable == 0 and self.maxSurge == 0:
            raise ValueError("maxUnavailable and maxSurge cannot both be 0: no update could start")
        return self


class RestartPolicy(_Model):
    condition: Literal["none", "on-failure", "any"] = "any"
    delaySeconds: Annotated[int, Field(ge=0, le=DAY_SECONDS)] = 10
    maxAttempts: Annotated[int, Field(ge=0, le=10000)] = Field(0, description="0 means unlimited.")


AUTOSCALING_METRICS = ("requestsWaitingPerReplica", "requestsRunningPerReplica", "kvCacheUsage")
MAX_STABILIZATION_SECONDS = 3600


class AutoscalingTarget(_Model):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.metric != 'kvCacheUsage' || double(self.value) <= 1.0",
                    "message": "a kvCacheUsage target is a fraction of the KV cache (at most 1)",
                }
            ]
        }
    )

    metric: Literal["requestsWaitingPerReplica", "requestsRunningPerReplica", "kvCacheUsage"] = (
        Field(
            ...,
            description=(
                "vLLM's vllm:num_requests_waiting or vllm:num_requests_running per replica, or "
                "vllm:kv_cache_usage_perc (0..1, the mean over replicas)."
            ),
        )
    )
    value: Annotated[float, Field(ge=0.01, le=1e6)] = Field(
        ..., description="The value per replica (or KV cache fraction) to hold the metric at."
    )

    @model_validator(mode="after")
    def _fraction(self) -> AutoscalingTarget:
        if self.metric == "kvCacheUsage" and self.value > 1:
            raise ValueError("a kvCacheUsage target is a fraction of the KV cache (at most 1)")
        return self


class Autoscaling(_Model):
    """npuswarm's own autoscaler (docs/autoscaling.md). With it set npuswarm owns the count:
    spec.replicas is not read, and HPA or KEDA must not drive this deployment."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.minReplicas) || self.minReplicas <= self.maxReplicas",
                    "message": "autoscaling.minReplicas must not exceed maxReplicas",
                }
            ]
        }
    )

    minReplicas: Annotated[int, Field(ge=0, le=MAX_REPLICAS)] = Field(
        1,
        description=(
            "The fewest replicas. 0: scale to zero, releasing every NPU after no request for "
            "scaleDownStabilizationSeconds; a request at a ModelGateway starts one again "
            "(docs/autoscaling.md)."
        ),
    )
    maxReplicas: Annotated[int, Field(ge=1, le=MAX_REPLICAS)] = Field(
        ..., description="The most replicas the autoscaler asks for."
    )
    target: AutoscalingTarget
    scaleUpStabilizationSeconds: Annotated[int, Field(ge=0, le=MAX_STABILIZATION_SECONDS)] = Field(
        30, description="A scale-up waits until every recommendation this long agrees."
    )
    scaleDownStabilizationSeconds: Annotated[int, Field(ge=0, le=MAX_STABILIZATION_SECONDS)] = (
        Field(300, description="A scale-down waits until every recommendation this long agrees.")
    )

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.minReplicas > self.maxReplicas:
            raise ValueError(
                f"autoscaling.minReplicas={self.minReplicas} exceeds maxReplicas={self.maxReplicas}"
            )
        return self


def _trimmed(path: str) -> str:
    """CEL for ``path`` without its trailing '/' (the patterns allow at most one)."""
    return f"({path}.endsWith('/') ? {path}.substring(0, size({path}) - 1) : {path})"


_NPUS_PER_REPLICA = (
    "(has(self.npusPerReplica) ? self.npusPerReplica : "
    "(has(self.engine) && has(self.engine.tensorParallelSize) "
    "? self.engine.tensorParallelSize : 1))"
)
_NODES_PER_REPLICA = "(has(self.nodesPerReplica) ? self.nodesPerReplica : 1)"
_TENSOR_PARALLEL = (
    "(has(self.engine) && has(self.engine.tensorParallelSize) ? self.engine.tensorParallelSize : 1)"
)
_HAS_DP = "(has(self.engine) && has(self.engine.dataParallelSize))"
_MULTI_NODE = f"({_NODES_PER_REPLICA} > 1)"
_INGRESS = "(has(self.publish) && has(self.publish.mode) && self.publish.mode == 'ingress')"
# The cross-field rules of ModelDeploymentSpec._consistent, for `kubectl apply` to refuse at
# admission. Defaults are applied before these run, but fields defaulted by a factory in
# pydantic (engine, ...) may still be absent, hence the has() guards.
SPEC_RULES: list[JsonValue] = [
    {
        "rule": "!has(self.npusPerReplica) || !has(self.engine) "
        "|| !has(self.engine.tensorParallelSize) "
        "|| self.npusPerReplica >= self.engine.tensorParallelSize",
        "message": "npusPerReplica is less than engine.tensorParallelSize",
    },
    {
        "rule": f"!has(self.npuIds) || size(self.npuIds) == {_NPUS_PER_REPLICA}",
        "message": "npuIds must name as many NPUs as a replica gets (npusPerReplica)",
    },
    {
        "rule": f"!{_INGRESS} || !has(self.network) || !has(self.network.endpointMode) "
        "|| self.network.endpointMode != 'dnsrr'",
        "message": "publish.mode=ingress needs network.endpointMode=vip: Swarm refuses ingress "
        "ports on dnsrr services",
    },
    {
        "rule": "!has(self.volumes) || self.volumes.all(v, "
        "v.mountPath != '/dev/shm' && v.mountPath != '/dev/shm/')",
        "message": "volumes must not mount /dev/shm: set shmSize instead",
    },
    {
        "rule": f"!{_INGRESS} || ((!has(self.mode) || self.mode != 'PerNode') "
        "&& (!has(self.replicas) || self.replicas <= 1))",
        "message": "publish.mode=ingress allows a single replica: every replica is its own "
        "Swarm service and an ingress port can be taken only once; use mode=host",
    },
    {
        "rule": "!has(self.volumes) || self.volumes.all(v, self.volumes.exists_one(w, "
        f"{_trimmed('w.mountPath')} == {_trimmed('v.mountPath')}))",
        "message": "two volumes use the same mountPath",
    },
    {
        "rule": "!has(self.autoscaling) || (!has(self.mode) || self.mode != 'PerNode')",
        "message": "autoscaling counts replicas: PerNode runs one on every matching node",
    },
    {
        "rule": f"!has(self.autoscaling) || !{_INGRESS} || self.autoscaling.maxReplicas <= 1",
        "message": "publish.mode=ingress allows a single replica: autoscaling.maxReplicas "
        "must be 1",
    },
    {
        "rule": "!has(self.autoscaling) || !has(self.autoscaling.minReplicas) "
        "|| self.autoscaling.minReplicas > 0 || has(self.network)",
        "message": "autoscaling.minReplicas=0 needs network: only a ModelGateway on that network "
        "can hold a request while a replica starts",
    },
    {
        "rule": "!has(self.shmSize) || (quantity(self.shmSize).isGreaterThan(quantity('0')) "
        "&& quantity(self.shmSize).compareTo(quantity('1Ti')) <= 0)",
        "message": "shmSize must be more than 0 and at most 1Ti",
    },
    # A data-parallel group (docs/multi-node.md): ranks split evenly over the nodes, and each
    # node's NPUs are exactly its ranks times the tensor-parallel size.
    {
        "rule": f"!{_HAS_DP} || self.engine.dataParallelSize % {_NODES_PER_REPLICA} == 0",
        "message": "engine.dataParallelSize must be a multiple of nodesPerReplica: every node "
        "runs the same number of data-parallel ranks",
    },
    {
        "rule": f"!{_HAS_DP} || self.engine.dataParallelSize % {_NODES_PER_REPLICA} != 0 "
        f"|| {_NPUS_PER_REPLICA} == "
        f"self.engine.dataParallelSize / {_NODES_PER_REPLICA} * {_TENSOR_PARALLEL}",
        "message": "npusPerReplica (NPUs on each node) must equal engine.dataParallelSize / "
        "nodesPerReplica x engine.tensorParallelSize",
    },
    {
        "rule": f"!{_MULTI_NODE} || !has(self.mode) || self.mode != 'PerNode'",
        "message": "nodesPerReplica > 1 needs mode=Replicated: PerNode runs one replica inside "
        "each node",
    },
    {
        "rule": f"!{_MULTI_NODE} || (!has(self.network) && !has(self.publish))",
        "message": "a multi-node replica runs on the host network: network and publish do not "
        "apply (status.endpoint gives the leader's node address and port)",
    },
    {
        "rule": f"!({_MULTI_NODE} || {_HAS_DP}) || !has(self.engine) "
        "|| !has(self.engine.extraArgs) || self.engine.extraArgs.all(a, "
        + " && ".join(f"!a.startsWith('{p}')" for p in GROUP_OWNED_PREFIXES)
        + ")",
        "message": "extraArgs must not set data-parallel flags ("
        + ", ".join(f"{p}..." for p in GROUP_OWNED_PREFIXES)
        + "): npuswarm renders them from nodesPerReplica and engine.dataParallelSize",
    },
]


class ModelDeploymentSpec(_Model):
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": SPEC_RULES})

    image: str = Field(
        ..., max_length=MAX_STRING, pattern=IMAGE_PATTERN, description="The vllm-ascend image."
    )
    model: str = Field(
        ...,
        max_length=MAX_STRING,
        pattern=NOT_A_FLAG_PATTERN,
        description="Model path inside the container (or a model id); not starting with '-'.",
    )
    servedModelName: str | None = Field(
        None,
        max_length=MAX_STRING,
        pattern=NOT_A_FLAG_PATTERN,
        description="Name clients ask for; defaults to the model path.",
    )
    mode: Literal["Replicated", "PerNode"] = Field(
        "Replicated",
        description="PerNode runs one replica on every matching node (compose's global mode).",
    )
    replicas: Annotated[int, Field(ge=0, le=MAX_REPLICAS)] = Field(
        1,
        description=(
            "Ignored in PerNode mode, and when autoscaling is set (npuswarm owns the count "
            "then, in status.replicas)."
        ),
    )
    autoscaling: Autoscaling | None = Field(
        None, description="npuswarm's own autoscaler on the engines' load (docs/autoscaling.md)."
    )
    priority: Annotated[int, Field(ge=-MAX_PRIORITY, le=MAX_PRIORITY)] = Field(
        0,
        description=(
            "Higher first: placed before lower ones, and may stop replicas of lower-priority "
            "deployments when it cannot be placed (docs/priority.md). Age breaks ties."
        ),
    )
    npusPerReplica: NpuCount | None = Field(
        None, description="NPUs per replica; defaults to engine.tensorParallelSize."
    )
    nodesPerReplica: Annotated[int, Field(ge=1, le=MAX_NODES_PER_REPLICA)] = Field(
        1,
        description=(
            "Nodes one replica spans (a data-parallel group: one vLLM per node, the first "
            "serving the API, the others --headless); npusPerReplica is then the NPUs on "
            "each node. Such a replica uses the host network."
        ),
    )
    groupTopologyKey: str | None = Field(
        None,
        max_length=317,
        pattern=LABEL_KEY_PATTERN,
        description=(
            "A node label (e.g. a switch or rack label) the nodes of one multi-node replica "
            "should share; preferred, not required: the status says when it could not be met."
        ),
    )
    npuIds: list[Annotated[int, Field(ge=0, le=63)]] | None = Field(
        None,
        max_length=8,
        json_schema_extra={"x-kubernetes-list-type": "set"},
        description=(
            "Host NPU ids (davinciN) every replica (every node of a multi-node one) must use, "
            "instead of any free ones. As many as npusPerReplica; at most one replica per node."
        ),
    )
    engine: Engine = Field(default_factory=Engine)
    volumes: list[Volume] = Field(default_factory=list, max_length=MAX_VOLUMES)
    shmSize: str = Field(
        "1Gi",
        max_length=24,
        pattern=QUANTITY_PATTERN,
        description="Size of /dev/shm (at most 1Ti).",
    )
    nodeSelector: dict[str, Annotated[str, Field(max_length=MAX_STRING)]] = Field(
        default_factory=dict,
        max_length=64,
        description="Swarm node labels a node must carry.",
    )
    network: Network | None = None
    publish: Publish | None = None
    healthCheck: HealthCheck = Field(default_factory=HealthCheck)
    updateStrategy: UpdateStrategy = Field(default_factory=UpdateStrategy)
    restartPolicy: RestartPolicy = Field(default_factory=RestartPolicy)

    @field_validator("nodeSelector", mode="before")
    @classmethod
    def _null_values_are_unset(cls, selector: Any) -> Any:
        return _without_null_values(selector)

    @model_validator(mode="after")
    def _consistent(self) -> ModelDeploymentSpec:
        if self.npus_per_replica < self.engine.tensorParallelSize:
            raise ValueError(
                f"npusPerReplica={self.npus_per_replica} is less than "
                f"engine.tensorParallelSize={self.engine.tensorParallelSize}"
            )
        if self.npuIds is not None:
            if len(set(self.npuIds)) != len(self.npuIds):
                raise ValueError(f"npuIds {self.npuIds} repeats an NPU")
            if len(self.npuIds) != self.npus_per_replica:
                raise ValueError(
                    f"npuIds names {len(self.npuIds)} NPUs but a replica gets "
                    f"{self.npus_per_replica} (npusPerReplica)"
                )
        self._consistent_group()
        ingress = self.publish is not None and self.publish.mode == "ingress"
        if ingress and self.network is not None and self.network.endpointMode == "dnsrr":
            raise ValueError(
                "publish.mode=ingress needs network.endpointMode=vip: Swarm refuses ingress ports "
                "on dnsrr services"
            )
        if any(volume.mountPath.rstrip("/") == "/dev/shm" for volume in self.volumes):
            raise ValueError("volumes must not mount /dev/shm: set shmSize instead")
        mount_paths = [volume.mountPath.rstrip("/") for volume in self.volumes]
        if len(set(mount_paths)) != len(mount_paths):
            raise ValueError("two volumes use the same mountPath")
        if not 0 < self.shm_size_bytes <= MAX_SHM_BYTES:
            raise ValueError(f"shmSize must be more than 0 and at most 1Ti, not {self.shmSize}")
        if ingress and (self.mode == "PerNode" or self.replicas > 1):
            raise ValueError(
                "publish.mode=ingress allows a single replica: every replica is its own "
                "Swarm service and an ingress port can be taken only once; use mode=host"
            )
        if self.autoscaling is not None and self.mode == "PerNode":
            raise ValueError("autoscaling counts replicas: PerNode runs one on every matching node")
        if self.autoscaling is not None and self.autoscaling.minReplicas == 0 and not self.network:
            raise ValueError(
                "autoscaling.minReplicas=0 needs network: only a ModelGateway on that network "
                "can hold a request while a replica starts"
            )
        if self.autoscaling is not None and ingress and self.autoscaling.maxReplicas > 1:
            raise ValueError(
                "publish.mode=ingress allows a single replica: autoscaling.maxReplicas must be 1"
            )
        return self

    def _consistent_group(self) -> None:
        """The data-parallel rules of SPEC_RULES, with the numbers in the message."""
        nodes, tensor = self.nodesPerReplica, self.engine.tensorParallelSize
        data = self.engine.dataParallelSize
        if data is not None:
            if data % nodes:
                raise ValueError(
                    f"engine.dataParallelSize={data} must be a multiple of "
                    f"nodesPerReplica={nodes}: every node runs the same number of ranks"
                )
            if self.npus_per_replica != data // nodes * tensor:
                raise ValueError(
                    f"npusPerReplica={self.npus_per_replica} (NPUs on each node) must equal "
                    f"engine.dataParallelSize/nodesPerReplica x engine.tensorParallelSize = "
                    f"{data}/{nodes} x {tensor} = {data // nodes * tensor}"
                )
        if nodes > 1 and self.mode == "PerNode":
            raise ValueError(
                "nodesPerReplica > 1 needs mode=Replicated: PerNode runs one replica inside "
                "each node"
            )
        if nodes > 1 and (self.network is not None or self.publish is not None):
            raise ValueError(
                "a multi-node replica runs on the host network: network and publish do not "
                "apply (status.endpoint gives the leader's node address and port)"
            )
        if nodes > 1 or data is not None:
            for arg in self.engine.extraArgs:
                if arg.startswith(GROUP_OWNED_PREFIXES):
                    raise ValueError(
                        f"extraArgs must not set {arg.split('=', 1)[0]}: npuswarm renders "
                        "data-parallel flags from nodesPerReplica and engine.dataParallelSize"
                    )

    @property
    def npus_per_replica(self) -> int:
        """NPUs of one replica on each of its nodes."""
        return self.npusPerReplica or self.engine.tensorParallelSize

    @property
    def data_parallel_size(self) -> int:
        """Ranks of one replica over all its nodes (1 when nothing asks for data parallel)."""
        if self.engine.dataParallelSize is not None:
            return self.engine.dataParallelSize
        if self.nodesPerReplica == 1:
            return 1
        return self.nodesPerReplica * (self.npus_per_replica // self.engine.tensorParallelSize)

    @property
    def multi_node(self) -> bool:
        return self.nodesPerReplica > 1

    @property
    def served_model_name(self) -> str:
        return self.servedModelName or self.model

    @property
    def shm_size_bytes(self) -> int:
        return quantity_to_bytes(self.shmSize)


# The phases of a ModelDeployment (the printer column and a summary of the conditions).
Phase = Literal["Pending", "Progressing", "Ready", "Degraded", "Invalid"]


class ReplicaStatus(_Model):
    replica: str = Field(..., description="Replica slot: an index, or the node id in PerNode.")
    nodeId: str | None = None
    hostname: str | None = None
    npus: list[int] = Field(default_factory=list, description="Host NPU ids (davinciN).")
    service: str | None = Field(None, description="Swarm service name.")
    taskState: str | None = Field(None, description="Swarm state of the newest task.")
    ready: bool = False
    lastError: str | None = Field(None, description="The newest task error, verbatim.")
    message: str | None = Field(None, description="Why the replica is not placed or not ready.")


GroupState = Literal["Pending", "Starting", "Ready", "Restarting", "BackingOff"]


class GroupStatus(_Model):
    """One multi-node replica (a data-parallel group), read as one replica."""

    group: str = Field(..., description="The group's index; its members are <group>-m<member>.")
    state: GroupState = Field(
        ...,
        description=(
            "Pending (not every member has a place), Starting, Ready (every member runs the "
            "current spec and the leader is healthy), Restarting (every member is being "
            "replaced: one failed or moved), BackingOff (a member ended; the restart waits)."
        ),
    )
    ready: bool = False
    generation: int = Field(0, description="Raised each time the whole group is restarted.")
    restarts: int = Field(0, description="Restarts in a row after a member ended.")
    endpoint: str | None = Field(None, description="The leader's node address and API port.")
    message: str | None = None
    members: list[ReplicaStatus] = Field(default_factory=list)


class AutoscalerStatus(_Model):
    """The built-in autoscaler's last decision, what it read, and its last change."""

    desiredReplicas: int = Field(..., description="The count the autoscaler decided.")
    reason: str = Field(
        ...,
        description=(
            "Steady, ScaledUp, ScaledDown, ScaledToZero, ScaledFromZero, Idle (at zero), "
            "NoLoadReading or WaitingForNPUs."
        ),
    )
    message: str = ""
    metric: str | None = None
    observedValue: float | None = Field(None, description="The metric as the target reads it.")
    targetValue: float | None = None
    recommendation: int | None = Field(
        None, description="The count the load alone asks for (before windows and NPUs)."
    )
    lastScaleTime: str | None = None
    lastScaleMessage: str | None = None
    lastScaleReason: str | None = Field(
        None, description="ScaledUp, ScaledDown, ScaledToZero or ScaledFromZero."
    )


class ModelDeploymentStatus(_Model):
    observedGeneration: int | None = None
    phase: Phase = "Pending"
    replicas: int = Field(
        0, description="Replicas wanted now (the scale subresource's status.replicas)."
    )
    selector: str | None = Field(
        None,
        description=(
            "Label selector of this deployment's replicas, serialized (the scale "
            "subresource's labelSelectorPath, which HPA and KEDA need)."
        ),
    )
    readyReplicas: int = 0
    placedReplicas: int = 0
    npus: int = Field(0, description="NPUs held by this deployment's replicas.")
    endpoint: str | None = Field(None, description="host:port of the model on its network.")
    replicaStatuses: list[ReplicaStatus] = Field(default_factory=list)
    groupStatuses: list[GroupStatus] = Field(
        default_factory=list,
        description=(
            "Multi-node replicas (nodesPerReplica > 1): each group with its members; "
            "replicas, readyReplicas and placedReplicas then count groups."
        ),
    )
    conditions: list[Condition] = Field(default_factory=list)
    autoscaler: AutoscalerStatus | None = Field(
        None, description="Set when spec.autoscaling is (docs/autoscaling.md)."
    )


class ModelDeployment(Resource):
    apiVersion: Literal["npuswarm.io/v1alpha1"] = API_VERSION  # type: ignore[assignment]
    kind: Literal["ModelDeployment"] = KIND  # type: ignore[assignment]
    spec: ModelDeploymentSpec
