"""The ModelGateway API: one OpenAI-compatible endpoint in front of ModelDeployments.

Like deployment.py's, these models are the single source of truth for the CRD (``npuswarm crd``
writes crds/modelgateways.npuswarm.io.yaml from them) and for validation.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, model_validator

from npuswarm.api.meta import (
    API_VERSION,
    IMAGE_PATTERN,
    MAX_STRING,
    NETWORK_NAME_PATTERN,
    Condition,
    Resource,
    _Model,
)

KIND = "ModelGateway"
PLURAL = "modelgateways"
SINGULAR = "modelgateway"
SHORT_NAMES = ["mgw"]
# vllm-router's policies that make sense for a pool of identical vLLM replicas.
POLICIES = ("cache_aware", "power_of_two", "round_robin", "random")
DEFAULT_IMAGE = "npuswarm-gateway:0.1.17"
MAX_GATEWAY_REPLICAS = 64
Port = Annotated[int, Field(ge=1, le=65535)]
LabelValue = Annotated[str, Field(max_length=63, pattern=r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?$")]
# What Swarm takes after `node.labels.` in a placement constraint (swarmkit's constraint
# parser: letters, digits, '-', '_' and '.'; a '/' is refused when the service is written).
SwarmLabelKey = Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[-A-Za-z0-9_.]+$")]


class ModelSelector(_Model):
    matchLabels: dict[str, LabelValue] = Field(
        default_factory=dict,
        max_length=32,
        description="Labels a ModelDeployment (metadata.labels) must all carry; empty: all.",
    )


class GatewayPublish(_Model):
    mode: Literal["host", "ingress"] = Field(
        "host",
        description=(
            "host: the port is opened on each node running a gateway replica (one per node, "
            "works without IPVS); ingress: the routing mesh, on every node (needs IPVS)."
        ),
    )


class GatewayHealthCheck(_Model):
    """How vllm-router checks each backend on its own, between two operator passes."""

    intervalSeconds: Annotated[int, Field(ge=1, le=300)] = 5
    timeoutSeconds: Annotated[int, Field(ge=1, le=300)] = 3
    failureThreshold: Annotated[int, Field(ge=1, le=100)] = Field(
        2, description="Failed checks before vllm-router stops sending to a backend."
    )


class GatewayNetwork(_Model):
    name: str = Field(
        ...,
        max_length=255,
        pattern=NETWORK_NAME_PATTERN,
        description=(
            "The overlay network of the ModelDeployments it serves (their spec.network.name); "
            "deployments on another network are not backends."
        ),
    )


RateValue = Annotated[int, Field(ge=0, le=10**9)]
SecretName = Annotated[str, Field(max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")]
KeyName = Annotated[str, Field(max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")]


class RateLimit(_Model):
    """Per key (or for anonymous clients together); 0: no limit."""

    requestsPerMinute: RateValue = Field(0, description="Requests a minute; 0: no limit.")
    tokensPerMinute: RateValue = Field(
        0,
        description=(
            "Prompt and generated tokens a minute, as the engine reports them in `usage` "
            "(counted when a response ends; streams count when they ask for usage); 0: no limit."
        ),
    )


class KeyAccess(RateLimit):
    models: list[Annotated[str, Field(max_length=MAX_STRING)]] | None = Field(
        None, max_length=256, description="The served model names this key may use; unset: all."
    )


class ClientAccess(_Model):
    """Who may call the gateway's public port (docs/security.md, "Client access")."""

    apiKeysSecret: SecretName | None = Field(
        None,
        description=(
            "A Secret in the gateway's namespace whose every entry is one API key (entry name: "
            "the key's name, value: the key). Clients send `Authorization: Bearer <key>`. Unset: "
            "no key is asked. Rotation: add the new key, move clients, remove the old one; "
            "no restart. Keys never appear in status, events, logs or the Swarm spec."
        ),
    )
    allowAnonymous: bool = Field(
        False, description="With apiKeysSecret: also serve requests without a key."
    )
    anonymous: RateLimit = Field(
        default_factory=RateLimit, description="Limits of requests without a key, together."
    )
    perKey: RateLimit = Field(
        default_factory=RateLimit, description="Limits of each key without its own entry."
    )
    keys: dict[KeyName, KeyAccess] = Field(
        default_factory=dict, max_length=1024, description="Per key name: models and limits."
    )


class RequestLimits(_Model):
    """What one client can make the gateway hold, so slow or huge requests cannot take it down."""

    maxBodyBytes: Annotated[int, Field(ge=1024, le=2**30)] = Field(
        16 * 2**20, description="Largest request body; larger: 413."
    )
    bodyTimeoutSeconds: Annotated[int, Field(ge=1, le=3600)] = Field(
        30, description="Time to receive a request body; slower: 408."
    )
    maxInFlight: Annotated[int, Field(ge=1, le=100000)] = Field(
        1024, description="Requests in flight per gateway replica; more: 503 with Retry-After."
    )
    memoryBytes: Annotated[int, Field(ge=64 * 2**20, le=2**40)] = Field(
        2 * 2**30, description="The memory limit of each gateway replica's container."
    )


class ScaleFromZero(_Model):
    """How a gateway replica holds requests for a model scaled to zero (its ModelDeployment's
    autoscaling.minReplicas is 0) while npuswarm starts a replica (docs/autoscaling.md)."""

    maxWaitSeconds: Annotated[int, Field(ge=1, le=3600)] = Field(
        300,
        description=(
            "How long a request waits for a replica to be ready; then 503 model_not_ready "
            "with Retry-After. Long enough for a model to load (minutes on NPUs)."
        ),
    )
    maxQueuedRequests: Annotated[int, Field(ge=1, le=100000)] = Field(
        100,
        description=(
            "Requests held per model and gateway replica; more: 503 model_not_ready with "
            "Retry-After at once."
        ),
    )
    retryAfterSeconds: Annotated[int, Field(ge=1, le=3600)] = Field(
        30, description="The Retry-After of those 503 answers."
    )


class ModelGatewaySpec(_Model):
    image: str = Field(
        DEFAULT_IMAGE,
        max_length=MAX_STRING,
        pattern=IMAGE_PATTERN,
        description="The gateway image (hack/build-gateway-image): vllm-router and its front.",
    )
    port: Port = Field(8000, description="The published port clients call (OpenAI API).")
    publish: GatewayPublish = Field(default_factory=GatewayPublish)
    adminPort: Port = Field(
        8079,
        description=(
            "Host-published port on each gateway node where the operator pushes backends "
            "(TLS, requests signed with the gateway's own credential). Must differ from port."
        ),
    )
    replicas: Annotated[int, Field(ge=0, le=MAX_GATEWAY_REPLICAS)] = Field(
        1, description="Gateway replicas, each on a different node."
    )
    modelSelector: ModelSelector = Field(default_factory=ModelSelector)
    policy: Literal["cache_aware", "power_of_two", "round_robin", "random"] = Field(
        "cache_aware", description="vllm-router's routing policy among a model's replicas."
    )
    network: GatewayNetwork
    healthCheck: GatewayHealthCheck = Field(default_factory=GatewayHealthCheck)
    nodeSelector: dict[SwarmLabelKey, LabelValue] = Field(
        default_factory=dict,
        max_length=32,
        description="Swarm node labels gateway replicas need (keys without '/': Swarm's).",
    )
    clientAccess: ClientAccess = Field(default_factory=ClientAccess)
    requestLimits: RequestLimits = Field(default_factory=RequestLimits)
    scaleFromZero: ScaleFromZero = Field(default_factory=ScaleFromZero)

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.adminPort != self.port",
                    "message": "adminPort must differ from port",
                }
            ]
        }
    )

    @model_validator(mode="after")
    def _distinct_ports(self) -> ModelGatewaySpec:
        if self.adminPort == self.port:
            raise ValueError("adminPort must differ from port")
        return self


class GatewayModelStatus(_Model):
    model: str = Field(..., description="The served model name clients ask for.")
    deployment: str = Field(..., description="The ModelDeployment serving it.")
    backends: list[str] = Field(default_factory=list, description="Ready replicas' URLs.")


class ClientAccessStatus(_Model):
    keys: int = Field(0, description="API keys in effect (never the keys themselves).")
    secretVersion: str | None = Field(
        None, description="The resourceVersion of the keys Secret the replicas hold."
    )


class ModelGatewayStatus(_Model):
    observedGeneration: int | None = None
    phase: Literal["Pending", "Ready", "Degraded"] = "Pending"
    endpoint: str | None = Field(None, description="Where clients reach it (host:port).")
    replicas: int = 0
    readyReplicas: int = 0
    models: list[GatewayModelStatus] = Field(default_factory=list)
    clientAccess: ClientAccessStatus | None = None
    conditions: list[Condition] = Field(default_factory=list)


class ModelGateway(Resource):
    apiVersion: Literal["npuswarm.io/v1alpha1"] = API_VERSION  # type: ignore[assignment]
    kind: Literal["ModelGateway"] = KIND  # type: ignore[assignment]
    spec: ModelGatewaySpec
