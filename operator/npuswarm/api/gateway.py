"""The ModelGateway API: one OpenAI-compatible endpoint in front of ModelDeployments.

Like deployment.py's, these models are the single source of truth for the CRD (``npuswarm crd``
writes crds/modelgateways.npuswarm.io.yaml from them) and for validation.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from npuswarm.api.meta import (
    API_VERSION,
    IMAGE_PATTERN,
    MAX_STRING,
    NETWORK_NAME_PATTERN,
    Condition,
    ObjectMeta,
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
    nodeSelector: dict[str, LabelValue] = Field(
        default_factory=dict, max_length=32, description="Node labels gateway replicas need."
    )

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


class ModelGatewayStatus(_Model):
    observedGeneration: int | None = None
    phase: Literal["Pending", "Ready", "Degraded"] = "Pending"
    endpoint: str | None = Field(None, description="Where clients reach it (host:port).")
    replicas: int = 0
    readyReplicas: int = 0
    models: list[GatewayModelStatus] = Field(default_factory=list)
    conditions: list[Condition] = Field(default_factory=list)


class ModelGateway(BaseModel):
    model_config = ConfigDict(extra="ignore")
    apiVersion: Literal["npuswarm.io/v1alpha1"] = API_VERSION  # type: ignore[assignment]
    kind: Literal["ModelGateway"] = KIND  # type: ignore[assignment]
    metadata: ObjectMeta
    spec: ModelGatewaySpec

    @property
    def key(self) -> str:
        return self.metadata.key
