"""The ModelDeployment API: the single source of truth for the CRD schema and for validation.

Field names are camelCase because they are the wire format users write in YAML; the CRD in
crds/ is generated from these models (``npuswarm crd``), so editing a field here and
forgetting to regenerate fails a test.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

GROUP = "npuswarm.io"
VERSION = "v1alpha1"
KIND = "ModelDeployment"
PLURAL = "modeldeployments"
SINGULAR = "modeldeployment"
SHORT_NAMES = ["md"]
API_VERSION = f"{GROUP}/{VERSION}"

NPU_COUNTS = (1, 2, 4, 8)
NpuCount = Literal[1, 2, 4, 8]

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


def quantity_to_bytes(quantity: str) -> int:
    """Parse a Kubernetes-style binary/decimal quantity such as ``1Gi`` or ``512M``."""
    match = _QUANTITY.match(quantity)
    if match is None:
        raise ValueError(f"not a size quantity: {quantity!r} (use e.g. 512Mi, 1Gi, 16G)")
    return int(match.group(1)) * _QUANTITY_FACTORS[match.group(2)]


class _Model(BaseModel):
    # Unknown fields are errors: a typo such as `npuPerReplica` must not be silently ignored.
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Engine(_Model):
    """How vLLM is started inside the container."""

    tensorParallelSize: NpuCount = Field(1, description="vLLM --tensor-parallel-size.")
    enableExpertParallel: bool = Field(False, description="vLLM --enable-expert-parallel.")
    maxModelLen: Annotated[int, Field(ge=1)] | None = Field(
        None, description="vLLM --max-model-len; vLLM's default when unset."
    )
    port: Annotated[int, Field(ge=1, le=65535)] = Field(
        8000, description="Port vLLM listens on inside the container."
    )
    extraArgs: list[str] = Field(
        default_factory=list,
        description="More `vllm serve` arguments, one list item per argument (no shell).",
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment of the vLLM process."
    )

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
            if not re.match(ENV_NAME_PATTERN, name):
                raise ValueError(f"env name {name!r} is not a valid variable name")
            if name in OPERATOR_OWNED_ENV:
                raise ValueError(f"env must not set {name}: npuswarm sets it from the placement")
        return env


class Volume(_Model):
    hostPath: str = Field(..., min_length=1, pattern=r"^/", description="Absolute host path.")
    mountPath: str = Field(..., min_length=1, pattern=r"^/", description="Path in the container.")
    readOnly: bool = False


class Network(_Model):
    name: str = Field(..., min_length=1, description="An existing attachable overlay network.")
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
        "/health", pattern=r"^/[A-Za-z0-9/._~%&=?-]*$", description="HTTP path vLLM answers 200 on."
    )
    startPeriodSeconds: Annotated[int, Field(ge=0)] = Field(
        1800, description="Time a model may take to load before failed checks count."
    )
    intervalSeconds: Annotated[int, Field(ge=1)] = 30
    timeoutSeconds: Annotated[int, Field(ge=1)] = 10
    retries: Annotated[int, Field(ge=1)] = 3


class UpdateStrategy(_Model):
    maxUnavailable: Annotated[int, Field(ge=0)] = Field(
        1, description="Replicas that may be down at once while a spec change rolls out."
    )
    maxSurge: Annotated[int, Field(ge=0)] = Field(
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
    delaySeconds: Annotated[int, Field(ge=0)] = 10
    maxAttempts: Annotated[int, Field(ge=0)] = Field(0, description="0 means unlimited.")


class ModelDeploymentSpec(_Model):
    image: str = Field(..., min_length=1, description="The vllm-ascend image.")
    model: str = Field(..., min_length=1, description="Model path inside the container.")
    servedModelName: str | None = Field(
        None, description="Name clients ask for; defaults to the model path."
    )
    mode: Literal["Replicated", "PerNode"] = Field(
        "Replicated",
        description="PerNode runs one replica on every matching node (compose's global mode).",
    )
    replicas: Annotated[int, Field(ge=0)] = Field(1, description="Ignored in PerNode mode.")
    npusPerReplica: NpuCount | None = Field(
        None, description="NPUs per replica; defaults to engine.tensorParallelSize."
    )
    npuIds: list[Annotated[int, Field(ge=0, le=63)]] | None = Field(
        None,
        description=(
            "Host NPU ids (davinciN) every replica must use, instead of any free ones. "
            "As many as npusPerReplica; at most one replica per node."
        ),
    )
    engine: Engine = Field(default_factory=Engine)
    volumes: list[Volume] = Field(default_factory=list)
    shmSize: str = Field("1Gi", pattern=QUANTITY_PATTERN, description="Size of /dev/shm.")
    nodeSelector: dict[str, str] = Field(
        default_factory=dict, description="Swarm node labels a node must carry."
    )
    network: Network | None = None
    publish: Publish | None = None
    healthCheck: HealthCheck = Field(default_factory=HealthCheck)
    updateStrategy: UpdateStrategy = Field(default_factory=UpdateStrategy)
    restartPolicy: RestartPolicy = Field(default_factory=RestartPolicy)

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
        ingress = self.publish is not None and self.publish.mode == "ingress"
        if ingress and self.network is not None and self.network.endpointMode == "dnsrr":
            raise ValueError(
                "publish.mode=ingress needs network.endpointMode=vip: Swarm refuses ingress ports "
                "on dnsrr services"
            )
        if any(volume.mountPath.rstrip("/") == "/dev/shm" for volume in self.volumes):
            raise ValueError("volumes must not mount /dev/shm: set shmSize instead")
        if ingress and (self.mode == "PerNode" or self.replicas > 1):
            raise ValueError(
                "publish.mode=ingress allows a single replica: every replica is its own "
                "Swarm service and an ingress port can be taken only once; use mode=host"
            )
        return self

    @property
    def npus_per_replica(self) -> int:
        return self.npusPerReplica or self.engine.tensorParallelSize

    @property
    def served_model_name(self) -> str:
        return self.servedModelName or self.model

    @property
    def shm_size_bytes(self) -> int:
        return quantity_to_bytes(self.shmSize)


# Ready, Progressing and Degraded are for people and Argo CD (manifests/argocd/health.lua);
# Reconciling and Stalled are kstatus's abnormal-true pair, for Flux, kpt and cli-utils.
ConditionType = Literal["Ready", "Progressing", "Degraded", "Reconciling", "Stalled"]
ConditionStatus = Literal["True", "False", "Unknown"]
Phase = Literal["Pending", "Progressing", "Ready", "Degraded", "Invalid"]


class Condition(_Model):
    type: ConditionType
    status: ConditionStatus
    reason: str
    message: str = ""
    lastTransitionTime: str
    observedGeneration: int | None = None


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


class ModelDeploymentStatus(_Model):
    observedGeneration: int | None = None
    phase: Phase = "Pending"
    replicas: int = 0
    readyReplicas: int = 0
    placedReplicas: int = 0
    npus: int = Field(0, description="NPUs held by this deployment's replicas.")
    endpoint: str | None = Field(None, description="host:port of the model on its network.")
    replicaStatuses: list[ReplicaStatus] = Field(default_factory=list)
    conditions: list[Condition] = Field(default_factory=list)


class ObjectMeta(BaseModel):
    """The part of metadata npuswarm reads; everything else passes through untouched."""

    model_config = ConfigDict(extra="ignore")
    name: str
    namespace: str = "default"
    uid: str = ""
    generation: int = 0
    creationTimestamp: str | None = None
    deletionTimestamp: str | None = None


class ModelDeployment(BaseModel):
    model_config = ConfigDict(extra="ignore")
    apiVersion: Literal["npuswarm.io/v1alpha1"] = API_VERSION  # type: ignore[assignment]
    kind: Literal["ModelDeployment"] = KIND  # type: ignore[assignment]
    metadata: ObjectMeta
    spec: ModelDeploymentSpec

    @property
    def key(self) -> str:
        return f"{self.metadata.namespace}/{self.metadata.name}"


def validation_message(error: Exception) -> str:
    """A one-line, user-facing summary of a pydantic validation error."""
    from pydantic import ValidationError

    if not isinstance(error, ValidationError):
        return str(error)
    parts = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "spec"
        parts.append(f"{location}: {item['msg']}")
    return "; ".join(parts)
