"""What both kinds share: the API group, object metadata, conditions, the strict base model and
the field patterns both use. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

GROUP = "npuswarm.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Where an object without a namespace lives, as the API server defaults it.
DEFAULT_NAMESPACE = "default"
# An object's (uid, generation, deletionTimestamp): what tells its spec or life changed.
Stamp = tuple[str, int, str | None]

MAX_STRING = 1024
# An image reference: [registry[:port]/]path[:tag][@digest]; no spaces or control characters.
IMAGE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$"
# Docker's own rule for network names.
NETWORK_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class _Model(BaseModel):
    # Unknown fields are errors: a typo such as `npuPerReplica` must not be silently ignored.
    # Strict types, as the API server checks them: "2" or true is not an integer, 1 is not a
    # boolean, so what one accepts the other accepts.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        """The API server drops a null where the schema does not allow one (so the default
        applies, or a required field is missing); so do the models."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            key: value
            for key, value in data.items()
            if value is not None
            or key not in fields
            or (not fields[key].is_required() and fields[key].default is None)
        }


# Ready, Progressing and Degraded are for people and Argo CD (manifests/argocd/health.lua);
# Reconciling and Stalled are kstatus's abnormal-true pair, for Flux, kpt and cli-utils.
# ScalingActive only with spec.autoscaling (named as HPA names its own).
ConditionType = Literal[
    "Ready", "Progressing", "Degraded", "Reconciling", "Stalled", "ScalingActive"
]
ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(_Model):
    type: ConditionType
    status: ConditionStatus
    reason: str
    message: str = ""
    lastTransitionTime: str
    observedGeneration: int | None = None


class ObjectMeta(BaseModel):
    """The part of metadata npuswarm reads; everything else passes through untouched."""

    model_config = ConfigDict(extra="ignore")
    name: str
    namespace: str = "default"
    uid: str = ""
    generation: int = 0
    creationTimestamp: str | None = None
    deletionTimestamp: str | None = None
    # A ModelGateway's modelSelector matches them.
    labels: dict[str, str] = {}
    # Read for npuswarm.io/rotate-credential on a ModelGateway (gateway/credentials.py).
    annotations: dict[str, str] = {}

    @property
    def key(self) -> str:
        return object_key(self.namespace, self.name)


def object_key(namespace: str, name: str) -> str:
    """``namespace/name``: how npuswarm names an object in its maps, labels' owners and logs."""
    return f"{namespace}/{name}"


def split_key(key: str) -> tuple[str, str]:
    """``namespace/name`` -> (namespace, name)."""
    namespace, _, name = key.partition("/")
    return namespace, name


def metadata_key(metadata: Mapping[str, Any]) -> str:
    """The key of an object as kopf hands it over (raw metadata)."""
    return object_key(metadata.get("namespace") or DEFAULT_NAMESPACE, str(metadata.get("name")))


@dataclass(frozen=True)
class Indexed:
    """One object of kopf's in-memory index, as a pass reads it."""

    key: str
    metadata: Mapping[str, Any]
    spec: Mapping[str, Any]
    # Its last status: what this operator last wrote, else what the API server has (the index
    # may lag behind npuswarm's own writes).
    previous: dict[str, Any]


def walk_index(
    index: Mapping[Any, Iterable[Mapping[str, Any]]], written: Mapping[str, dict[str, Any]]
) -> Iterator[Indexed]:
    """Every object of a kopf index (``(namespace, name)`` -> store of indexed values)."""
    for store in index.values():
        for raw in store:
            metadata = raw["metadata"]
            key = metadata_key(metadata)
            previous = written.get(key) or dict(raw.get("status") or {})
            yield Indexed(key, metadata, raw.get("spec") or {}, previous)


def stamp(metadata: Mapping[str, Any]) -> Stamp:
    """What changes when an object's spec changes or its deletion starts: a status write
    changes none of it."""
    return (
        str(metadata.get("uid") or ""),
        int(metadata.get("generation") or 0),
        metadata.get("deletionTimestamp"),
    )


def validation_message(error: Exception) -> str:
    """A one-line, user-facing summary of a pydantic validation error."""
    if not isinstance(error, ValidationError):
        return str(error)
    parts = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "spec"
        parts.append(f"{location}: {item['msg']}")
    return "; ".join(parts)


class Resource(BaseModel):
    """What a ModelDeployment and a ModelGateway object share: metadata, and the key
    npuswarm knows it by. Fields other than metadata and spec are ignored (status, managed
    fields...): npuswarm reads the spec and writes the status."""

    model_config = ConfigDict(extra="ignore")
    metadata: ObjectMeta

    @property
    def key(self) -> str:
        return self.metadata.key
